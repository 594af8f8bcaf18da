"""The kernel configure step against a real Kconfig tree (Debian's linux-source 6.12).

The Kconfig files, scripts/ (scripts/config, the kconfig sources) and the Makefiles
are taken out of /usr/src/linux-source-6.*.tar.xz (package linux-source-6.12), about
25 MB; `make defconfig` / `make olddefconfig` then build and run the kernel's own
kconfig. 6.12 knows INTEL_TDX_HOST, and really drops it from an x86_64 defconfig
(it needs X86_X2APIC and CONTIG_ALLOC), which the step must name. The upstream
manifest's symbols meet 6.12's two limits: INTEL_TDX_HOST still depends on
!KEXEC_CORE there (6.18 dropped that), and KVM_INTEL_TDX (6.16) does not exist yet.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tdxvirt.build import BuildFailedError, kconfig, progress, runner, steps
from tdxvirt.build import manifest as manifests
from tdxvirt.host import HostRoot


def _linux_source() -> Path | None:
    """The newest /usr/src/linux-source-X.Y.tar.xz that knows INTEL_TDX_HOST (6.8+)."""
    found = []
    for path in Path("/usr/src").glob("linux-source-*.tar.xz"):
        match = re.fullmatch(r"linux-source-(\d+)\.(\d+)\.tar\.xz", path.name)
        if match and (int(match.group(1)), int(match.group(2))) >= (6, 8):
            found.append(((int(match.group(1)), int(match.group(2))), path))
    return max(found)[1] if found else None


@pytest.fixture(scope="module")
def kernel_workdir(tmp_path_factory) -> Path:
    tarball = _linux_source()
    missing = [tool for tool in ("make", "gcc", "flex", "bison") if shutil.which(tool) is None]
    if tarball is None or missing:
        pytest.skip("needs Debian's linux-source-6.12 and make, gcc, flex, bison "
                    f"(missing: {', '.join(missing) or 'linux-source'}); scripts/setup installs them")
    workdir = tmp_path_factory.mktemp("kernel-build")
    top = tarball.name[:-len(".tar.xz")]
    subprocess.run(["tar", "-xJf", str(tarball), "-C", str(workdir), "--wildcards",
                    "*Kconfig*", f"{top}/scripts/*", f"{top}/Makefile", f"{top}/arch/x86/Makefile*",
                    f"{top}/arch/x86/configs/*"], check=True)
    (workdir / "src").mkdir()
    (workdir / top).rename(workdir / "src" / "kernel")
    return workdir


def _manifest_file(workdir: Path, name: str, enable, module=(), disable=()) -> Path:
    file = workdir / f"manifest-{name}.toml"
    file.write_text(f"""
[kernel]
url = "{workdir / 'src' / 'kernel'}"
ref = "v6.12"

[kernel.config]
base = "defconfig"
enable = {list(enable)!r}
module = {list(module)!r}
disable = {list(disable)!r}
""".replace("'", '"'))
    return file


def _context(workdir: Path, extra_enable: list[str]) -> steps.Context:
    """The source document's symbols (its manifest) plus ``extra_enable``."""
    legacy = manifests.load("intel-device-passthrough").kernel.config
    file = _manifest_file(workdir, f"legacy-{len(extra_enable)}", list(legacy.enable) + extra_enable,
                          disable=legacy.disable)
    return steps.Context(manifests.load(file), workdir, jobs=2, install=False, host=HostRoot("/"))


def test_configure_names_what_kconfig_dropped_then_keeps_what_is_asked(kernel_workdir, tmp_path):
    tree = kernel_workdir / "src" / "kernel"
    record = tmp_path / "state" / "build" / "artifacts.json"
    configure = [steps.KernelConfigure()]

    # the source document's symbols alone: Kconfig drops two of them on x86_64 defconfig
    ctx = _context(kernel_workdir, [])
    with pytest.raises(BuildFailedError) as caught:
        runner.run(configure, ctx, progress.ConsoleReporter(io.StringIO(), live=False), record)
    message = str(caught.value)
    assert message.startswith("kernel configure failed: Kconfig did not keep 2 requested symbol(s): ")
    assert ("INTEL_TDX_HOST (asked y, got n; unmet: X86_X2APIC, CONTIG_ALLOC; "
            "see arch/x86/Kconfig:") in message
    assert "TDX_GUEST_DRIVER (asked y, got n; unmet: INTEL_TDX_GUEST, VIRT_DRIVERS; " \
           "see drivers/virt/coco/tdx-guest/Kconfig:1)" in message
    assert f"full log: {kernel_workdir}/logs/kernel.configure.log" in message
    assert not (kernel_workdir / "stamps/kernel.configure.json").exists()
    log = (kernel_workdir / "logs/kernel.configure.log").read_text()
    assert "make defconfig" in log and "scripts/config --file .config --enable INTEL_TDX_HOST" in log

    # with what they depend on, every symbol ends up as asked
    ctx = _context(kernel_workdir, ["X86_X2APIC", "CMA", "INTEL_TDX_GUEST", "VIRT_DRIVERS"])
    summary = runner.run(configure, ctx, progress.ConsoleReporter(io.StringIO(), live=False), record)
    assert summary.executed == ["kernel.configure"]
    values = kconfig.read_config(tree / ".config")
    for symbol in ("INTEL_TDX_HOST", "KVM", "KVM_INTEL", "TDX_GUEST_DRIVER", "HYPERV", "X86_X2APIC"):
        assert values[symbol] == "y", symbol
    assert values["KEXEC"] == "n"
    assert "CRASH_DUMP" not in values or values["CRASH_DUMP"] == "n"
    assert "# CONFIG_KEXEC is not set" in (tree / ".config").read_text()
    assert "kept as asked: INTEL_TDX_HOST=y" in (kernel_workdir / "logs/kernel.configure.log").read_text()

    again = runner.run(configure, ctx, progress.ConsoleReporter(io.StringIO(), live=False), record)
    assert again.executed == [] and again.skipped == ["kernel.configure"]


def test_the_upstream_symbols_on_6_12_need_what_6_18_brought(kernel_workdir, tmp_path):
    """The upstream manifest's kernel config on the real 6.12 Kconfig: everything a TDX
    host with GPU passthrough needs is kept, except what only newer kernels give."""
    tree = kernel_workdir / "src" / "kernel"
    record = tmp_path / "state" / "build" / "artifacts.json"
    upstream = manifests.load("upstream").kernel.config
    assert not upstream.disable  # kexec and kdump stay: 6.18 allows them with TDX
    file = _manifest_file(kernel_workdir, "upstream", upstream.enable, upstream.module)
    ctx = steps.Context(manifests.load(file), kernel_workdir, jobs=2, install=False, host=HostRoot("/"))
    with pytest.raises(BuildFailedError) as caught:
        runner.run([steps.KernelConfigure()], ctx, progress.ConsoleReporter(io.StringIO(), live=False), record)
    message = str(caught.value)
    assert "Kconfig did not keep 2 requested symbol(s): " in message
    # the term names what keeps KEXEC_CORE on: disabling KEXEC_CORE itself would not do
    assert "INTEL_TDX_HOST (asked y, got n; unmet: !KEXEC_CORE (selected by KEXEC); see arch/x86/Kconfig:" in message
    assert "KVM_INTEL_TDX (asked y, got n; no Kconfig entry defines it in this tree)" in message

    # without KVM_INTEL_TDX and with kexec off (6.12's rule), 6.12 keeps every other symbol,
    # the dependencies listed for a defconfig base included, KVM and VFIO as modules
    enable = [s for s in upstream.enable if s != "KVM_INTEL_TDX"]
    file = _manifest_file(kernel_workdir, "upstream-6.12", enable, upstream.module,
                          ["KEXEC", "KEXEC_FILE", "CRASH_DUMP"])
    ctx = steps.Context(manifests.load(file), kernel_workdir, jobs=2, install=False, host=HostRoot("/"))
    runner.run([steps.KernelConfigure()], ctx, progress.ConsoleReporter(io.StringIO(), live=False), record)
    values = kconfig.read_config(tree / ".config")
    for symbol in ("INTEL_TDX_HOST", "X86_X2APIC", "CMA", "INTEL_IOMMU", "IOMMUFD_DRIVER", "VFIO_DEVICE_CDEV"):
        assert values[symbol] == "y", symbol
    for symbol in ("KVM", "KVM_INTEL", "IOMMUFD", "VFIO", "VFIO_PCI"):
        assert values[symbol] == "m", symbol
    assert values["CONTIG_ALLOC"] == "y"  # CMA's doing: INTEL_TDX_HOST's dependency


def test_a_selected_symbol_is_named_with_what_selects_it(kernel_workdir, tmp_path):
    """6.12's INTEL_TDX_HOST needs !KEXEC_CORE, which no one sets by hand: KEXEC selects
    it. Disabling KEXEC_CORE itself (what "unmet: !KEXEC_CORE" suggests) is undone by
    olddefconfig, so the message names the selector; disabling that is what works."""
    tree = kernel_workdir / "src" / "kernel"
    record = tmp_path / "state" / "build" / "artifacts.json"
    enable, kvm = ["INTEL_TDX_HOST", "X86_X2APIC", "CMA"], ["KVM", "KVM_INTEL"]
    ctx = steps.Context(manifests.load(_manifest_file(kernel_workdir, "kexec-core", enable, kvm, ["KEXEC_CORE"])),
                        kernel_workdir, jobs=2, install=False, host=HostRoot("/"))
    with pytest.raises(BuildFailedError) as caught:
        runner.run([steps.KernelConfigure()], ctx, progress.ConsoleReporter(io.StringIO(), live=False), record)
    message = str(caught.value)
    assert "INTEL_TDX_HOST (asked y, got n; unmet: !KEXEC_CORE (selected by KEXEC); see arch/x86/Kconfig:" in message
    assert "KEXEC_CORE (asked n, got y; selected by KEXEC; see kernel/Kconfig.kexec:" in message
    assert "for a `!X` disable X, or what selects it" in message and "\n" not in message

    ctx = steps.Context(manifests.load(_manifest_file(kernel_workdir, "kexec", enable, kvm, ["KEXEC"])),
                        kernel_workdir, jobs=2, install=False, host=HostRoot("/"))
    runner.run([steps.KernelConfigure()], ctx, progress.ConsoleReporter(io.StringIO(), live=False), record)
    values = kconfig.read_config(tree / ".config")
    assert values["INTEL_TDX_HOST"] == "y" and values.get("KEXEC_CORE", "n") == "n"
    assert kconfig.KconfigTree(tree).selectors("KEXEC_CORE") == ["KEXEC", "KEXEC_FILE"]


def test_kconfig_entries_carry_their_enclosing_conditions(kernel_workdir):
    tree = kernel_workdir / "src" / "kernel"
    where, depends = kconfig.kconfig_entry(tree, "TDX_GUEST_DRIVER")
    assert where == "drivers/virt/coco/tdx-guest/Kconfig:1"
    assert depends == ["INTEL_TDX_GUEST", "VIRT_DRIVERS"]  # the second from `if VIRT_DRIVERS`
    where, depends = kconfig.kconfig_entry(tree, "INTEL_TDX_HOST")
    assert where.startswith("arch/x86/Kconfig:")
    assert depends == ["CPU_SUP_INTEL", "X86_64", "KVM_INTEL", "X86_X2APIC", "CONTIG_ALLOC",
                       "!KEXEC_CORE", "X86_MCE"]
    _, depends = kconfig.kconfig_entry(tree, "HYPERV")  # a continued `depends on` line
    assert depends[0] == "(X86 && X86_LOCAL_APIC && HYPERVISOR_GUEST) || (ACPI && ARM64 && !CPU_BIG_ENDIAN)"
    assert kconfig.kconfig_entry(tree, "NO_SUCH_SYMBOL_ANYWHERE") is None


def test_scripts_config_argv_and_reading_a_config():
    assert kconfig.scripts_config_argv(".config", ["KVM"], ["KVM_INTEL"], ["KEXEC"]) == [
        "scripts/config", "--file", ".config", "--enable", "KVM", "--module", "KVM_INTEL",
        "--disable", "KEXEC"]
    config = {"KVM": "y", "KVM_INTEL": "m", "KEXEC": "n", "LOCALVERSION": '""'}
    assert kconfig.mismatches(config, ["KVM"], ["KVM_INTEL"], ["KEXEC", "CRASH_DUMP"]) == []
    assert kconfig.mismatches(config, ["KVM_INTEL"], [], ["KVM"]) == [
        kconfig.Mismatch("KVM_INTEL", "y", "m"), kconfig.Mismatch("KVM", "n", "y")]
    assert kconfig.unmet(["KVM && IA32_FEAT_CTL", "!KEXEC_CORE", "X86_64 || ARM64"],
                         {"KVM": "y", "KEXEC_CORE": "y"}) == ["IA32_FEAT_CTL", "!KEXEC_CORE", "X86_64 || ARM64"]


def test_a_distribution_configs_own_key_files_are_emptied(kernel_workdir, tmp_path):
    """Debian's config names debian/certs/debian-uefi-certs.pem, a file of its packaging
    tree: kept, a kernel.org tree's build stops at the end ("No rule to make target")."""
    tree = kernel_workdir / "src" / "kernel"
    base = tmp_path / "config-6.12.48-amd64"
    base.write_text('CONFIG_KEYS=y\nCONFIG_ASYMMETRIC_KEY_TYPE=y\nCONFIG_ASYMMETRIC_PUBLIC_KEY_SUBTYPE=y\n'
                    'CONFIG_X509_CERTIFICATE_PARSER=y\nCONFIG_SYSTEM_TRUSTED_KEYRING=y\n'
                    'CONFIG_SYSTEM_TRUSTED_KEYS="debian/certs/debian-uefi-certs.pem"\n'
                    'CONFIG_SYSTEM_REVOCATION_LIST=y\n'
                    'CONFIG_SYSTEM_REVOCATION_KEYS="debian/certs/debian-uefi-revoked.pem"\n'
                    'CONFIG_MODULE_SIG_KEY="certs/signing_key.pem"\n')
    assert kconfig.distribution_key_files(base) == ["SYSTEM_TRUSTED_KEYS", "SYSTEM_REVOCATION_KEYS"]
    file = tmp_path / "manifest.toml"
    file.write_text(f'[kernel]\nurl = "{tree}"\nref = "v6.12"\n[kernel.config]\nbase = "{base}"\n'
                    'enable = ["CRYPTO", "KEYS", "ASYMMETRIC_KEY_TYPE", "ASYMMETRIC_PUBLIC_KEY_SUBTYPE", '
                    '"X509_CERTIFICATE_PARSER", "PKCS7_MESSAGE_PARSER", "SYSTEM_TRUSTED_KEYRING", '
                    '"SYSTEM_BLACKLIST_KEYRING", "SYSTEM_REVOCATION_LIST"]\n')
    ctx = steps.Context(manifests.load(file), kernel_workdir, jobs=2, install=False, host=HostRoot("/"))
    runner.run([steps.KernelConfigure()], ctx, progress.ConsoleReporter(io.StringIO(), live=False),
               tmp_path / "state" / "artifacts.json")
    values = kconfig.read_config(tree / ".config")
    assert values["SYSTEM_TRUSTED_KEYRING"] == "y"  # the symbols are live in this config ...
    text = (tree / ".config").read_text()  # ... and emptied to the kernel's default
    assert 'CONFIG_SYSTEM_TRUSTED_KEYS=""\n' in text and 'CONFIG_SYSTEM_REVOCATION_KEYS=""\n' in text
    assert "debian/" not in text
    log = (kernel_workdir / "logs/kernel.configure.log").read_text()
    assert "scripts/config --file .config --set-str SYSTEM_TRUSTED_KEYS '' --set-str SYSTEM_REVOCATION_KEYS ''" in log
