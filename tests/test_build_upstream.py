"""The default manifest: the upstream TDX stack, released tags, no patch sets.

Linux v6.18 (LTS; KVM TDX since 6.16, kexec allowed with TDX since 6.18), QEMU
v10.2.0 (tdx-guest since 10.1, built in whenever KVM is), edk2-stable202605 with the
TDX firmware platform OvmfPkg/IntelTdx/IntelTdxX64.dsc and the GCC tag it defines.
Plans go through the CLI with ``--all`` so the machine running the tests cannot
change them; `build plan` without it is tested in test_build_distro.py.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from click.testing import CliRunner

from tdxvirt.build import edk2, steps
from tdxvirt.build import manifest as manifests
from tdxvirt.build.manifest import SHIPPED, default_manifest_path, shipped_path
from tdxvirt.cli import TdxvirtGroup, main
from tdxvirt.cli.build import build

UPSTREAM_TARGET_TXT = """ACTIVE_PLATFORM = OvmfPkg/IntelTdx/IntelTdxX64.dsc
TARGET = RELEASE
TARGET_ARCH = X64
TOOL_CHAIN_CONF = Conf/tools_def.txt
TOOL_CHAIN_TAG = GCC
BUILD_RULE_CONF = Conf/build_rule.txt
MAX_CONCURRENT_THREAD_NUMBER = 4
"""


def test_the_default_is_the_upstream_manifest():
    loaded = manifests.load()
    assert loaded.path == str(default_manifest_path().resolve()) == str(shipped_path("upstream").resolve())
    assert Path(loaded.path).name == "upstream.toml"
    assert manifests.load("upstream") == loaded
    assert loaded.repos == {}  # no patch sets, so no repository of them
    kernel, qemu, ovmf = loaded.kernel, loaded.qemu, loaded.ovmf
    assert (kernel.repo.url, kernel.repo.ref, kernel.repo.depth) == (
        "https://git.kernel.org/pub/scm/linux/kernel/git/stable/linux.git", "v6.18", 1)
    assert kernel.patches == () and qemu.patches == () and ovmf.patches == ()
    config = kernel.config
    assert config.base == "current"
    assert {"INTEL_TDX_HOST", "KVM_INTEL_TDX", "VFIO_DEVICE_CDEV", "IOMMUFD_DRIVER"} <= set(config.enable)
    assert {"X86_X2APIC", "X86_MCE", "CMA"} <= set(config.enable)  # INTEL_TDX_HOST's dependencies
    assert config.module == ("KVM", "KVM_INTEL", "IOMMUFD", "VFIO", "VFIO_PCI")
    assert config.disable == ()  # 6.18: kexec and kdump work with TDX
    for dropped in ("HYPERV", "TDX_GUEST_DRIVER", "KEXEC", "CRASH_DUMP"):
        assert dropped not in config.enable + config.module + config.disable
    assert (qemu.repo.url, qemu.repo.ref) == ("https://gitlab.com/qemu-project/qemu.git", "v10.2.0")
    assert qemu.configure == ("--target-list=x86_64-softmmu", "--enable-kvm")
    assert (ovmf.repo.url, ovmf.repo.ref, ovmf.repo.submodules) == (
        "https://github.com/tianocore/edk2.git", "edk2-stable202605", (
            "CryptoPkg/Library/OpensslLib/openssl", "BaseTools/Source/C/BrotliCompress/brotli",
            "MdeModulePkg/Library/BrotliCustomDecompressLib/brotli", "MdePkg/Library/BaseFdtLib/libfdt",
            "MdePkg/Library/MipiSysTLib/mipisyst", "CryptoPkg/Library/MbedTlsLib/mbedtls",
            "SecurityPkg/DeviceSecurity/SpdmLib/libspdm"))
    assert (ovmf.platform, ovmf.target, ovmf.arch, ovmf.toolchain) == (
        "OvmfPkg/IntelTdx/IntelTdxX64.dsc", "RELEASE", "X64", "GCC")
    assert edk2.target_txt(ovmf, 4) == UPSTREAM_TARGET_TXT


def test_both_shipped_manifests_parse_and_are_package_data():
    for name, file in SHIPPED.items():
        path = shipped_path(name)
        assert path.name == file and path.parent.name == "build"  # pyproject: "tdxvirt.build" = ["*.toml"]
        loaded = manifests.load(name)
        assert loaded.components() == ("kernel", "qemu", "ovmf")
        tomllib.loads(path.read_text())  # plain TOML


def _plan(workdir: Path, *args: str) -> dict:
    group = TdxvirtGroup(name="tdxvirt", commands={"build": build})
    result = CliRunner().invoke(group, ["build", "plan", "--workdir", str(workdir), "-j", "4",
                                        "--json", "--all", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_the_upstream_plan_names_its_refs_and_options(tmp_path):
    w = tmp_path / "w"
    plan = _plan(w)
    assert [(s["component"], s["step"]) for s in plan["steps"]] == [
        ("kernel", "fetch"), ("kernel", "configure"), ("kernel", "build"),
        ("qemu", "fetch"), ("qemu", "configure"), ("qemu", "build"),
        ("ovmf", "fetch"), ("ovmf", "configure"), ("ovmf", "build"),
    ]  # no tdx-linux fetch, no patch steps
    commands = {(s["component"], s["step"]): "\n".join(s["commands"]) for s in plan["steps"]}
    assert ("remote add origin https://git.kernel.org/pub/scm/linux/kernel/git/stable/linux.git"
            in commands["kernel", "fetch"])
    assert "fetch --depth=1 origin v6.18\n" in commands["kernel", "fetch"] + "\n"
    configure = commands["kernel", "configure"]
    assert ("scripts/config --file .config --enable INTEL_TDX_HOST --enable KVM_INTEL_TDX "
            "--enable X86_X2APIC --enable X86_MCE --enable CMA --enable INTEL_IOMMU "
            "--enable IOMMUFD_DRIVER --enable VFIO_DEVICE_CDEV --module KVM --module KVM_INTEL "
            "--module IOMMUFD --module VFIO --module VFIO_PCI") in configure
    assert "--disable" not in configure and "HYPERV" not in configure
    assert "verify .config: INTEL_TDX_HOST=y KVM_INTEL_TDX=y" in configure
    assert "fetch --depth=1 origin v10.2.0" in commands["qemu", "fetch"]
    assert commands["qemu", "configure"].endswith("./configure --target-list=x86_64-softmmu --enable-kvm")
    assert "fetch --depth=1 origin edk2-stable202605" in commands["ovmf", "fetch"]
    assert "submodule update --init" in commands["ovmf", "fetch"]
    ovmf = commands["ovmf", "configure"]
    assert f"write {w}/src/ovmf/Conf/target.txt:\n" + "".join(
        f"    {line}\n" for line in UPSTREAM_TARGET_TXT.splitlines()) in ovmf + "\n"
    assert "defines TOOL_CHAIN_TAG GCC" in ovmf
    assert plan["artifacts"]["ovmf OVMF.fd"] == (
        f"{w}/src/ovmf/<OUTPUT_DIRECTORY of OvmfPkg/IntelTdx/IntelTdxX64.dsc>/RELEASE_GCC/FV/OVMF.fd")
    assert "GCC5" not in json.dumps(plan["steps"]) and "GCC6" not in json.dumps(plan["steps"])
    assert not w.exists()


def test_the_tdx_firmware_lands_where_the_dsc_says(tmp_path):
    tree = tmp_path / "edk2"
    (tree / "OvmfPkg/IntelTdx").mkdir(parents=True)
    (tree / "OvmfPkg/IntelTdx/IntelTdxX64.dsc").write_text(  # as edk2-stable202605 has it
        "[Defines]\n  PLATFORM_NAME                  = Ovmf\n"
        "  OUTPUT_DIRECTORY               = Build/IntelTdx\n  SUPPORTED_ARCHITECTURES        = X64\n")
    ovmf = manifests.load().ovmf
    assert edk2.image_path(tree, ovmf) == tree / "Build/IntelTdx/RELEASE_GCC/FV/OVMF.fd"


def test_one_component_of_the_upstream_manifest():
    loaded = manifests.load()
    assert [s.id for s in steps.plan(loaded, steps.select(loaded, "qemu"), True)] == [
        "qemu.fetch", "qemu.configure", "qemu.build", "qemu.install"]


def test_manifests_by_name_or_file(tmp_path, monkeypatch):
    by_name = _plan(tmp_path / "w", "--manifest", "intel-device-passthrough")
    assert by_name["manifest"] == str(shipped_path("intel-device-passthrough").resolve())
    assert by_name["steps"][0]["component"] == "tdx-linux"
    assert _plan(tmp_path / "w", "--manifest", "upstream")["manifest"] == str(default_manifest_path().resolve())
    # a file path, relative to the current folder; a name wins over a file called so,
    # ./NAME picks the file
    monkeypatch.chdir(tmp_path)
    Path("upstream").write_text("[qemu]\nurl = 'https://example.org/qemu.git'\nref = 'v10.1.0'\n")
    assert _plan(tmp_path / "w", "--manifest", "upstream")["manifest"] == str(default_manifest_path().resolve())
    local = _plan(tmp_path / "w", "--manifest", "./upstream")
    assert local["manifest"] == str(tmp_path / "upstream") and local["planned"] == ["qemu"]
    unknown = CliRunner().invoke(main, ["build", "plan", "--manifest", "intel-device-passthru"])
    assert unknown.exit_code == 2
    assert unknown.stderr == ("tdxvirt: error: manifest intel-device-passthru: no such file; give an "
                              "existing --manifest FILE or a shipped one by name (upstream, "
                              "intel-device-passthrough)\n")
