"""What the host already has from its distribution, and `build plan` planning only the rest.

Fake host roots (``build_host_root`` plus a dpkg status file and kernel config) stand
for a forky-like host (everything there: nothing to build), a Debian 12-like host
(nothing there) and mixed ones. Below a root other than ``/`` no program may run: the
roots carry a ``qemu-system-x86_64`` and a ``virtqemud`` that would leave a mark if
they ever ran. The ``/`` path (running QEMU's ``-object help``, ``virtqemud
--version``) is tested with a recording runner.
"""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdxvirt.build import distro
from tdxvirt.cli import main
from tdxvirt.host import HostRoot
from tdxvirt.host.commands import RecordingRunner, RefusingRunner
from tdxvirt.sim.hostroot import build_host_root

FORKY_KERNEL = "6.17.11+deb14-amd64"
DEBIAN12_KERNEL = "6.1.0-28-amd64"
DEBIAN12_FIRMWARE = {  # Debian 12's ovmf: descriptors, none with intel-tdx
    "description": "OVMF without SB+SMM, empty varstore",
    "interface-types": ["uefi"],
    "mapping": {"device": "flash", "executable": {"filename": "/usr/share/OVMF/OVMF_CODE_4M.fd",
                                                  "format": "raw"}},
    "targets": [{"architecture": "x86_64", "machines": ["pc-i440fx-*", "pc-q35-*"]}],
    "features": ["acpi-s3", "verbose-dynamic"], "tags": []}


def _status(packages: dict[str, str]) -> str:
    paragraphs = [f"Package: {name}\nStatus: install ok installed\nPriority: optional\n"
                  f"Version: {version}\nDescription: {name}\n continued description line\n"
                  for name, version in packages.items()]
    # removed, configuration files left: dpkg keeps the paragraph, the package is gone
    paragraphs.append("Package: qemu-system-x86\nStatus: deinstall ok config-files\n"
                      "Version: 1:11.0.0+ds-1\n")
    return "\n".join(paragraphs)


def _tripwire(root: Path, path: str) -> None:
    """A program that would mark that it ran (it must never run below a host root)."""
    program = root / path.lstrip("/")
    program.parent.mkdir(parents=True, exist_ok=True)
    program.write_text(f"#!/bin/sh\ntouch {root}/RAN\necho 'tdx-guest'\n")
    program.chmod(0o755)


def make_root(path: Path, *, kernel: str, config: dict[str, str] | None = None,
              tdx_param: str | None = None, kvm_intel_loaded: bool = False,
              packages: dict[str, str] | None = None, tdx_firmware: bool = False,
              programs: tuple[str, ...] = ("/usr/bin/qemu-system-x86_64", "/usr/sbin/virtqemud")) -> HostRoot:
    host = build_host_root(path, tdx_firmware=tdx_firmware)
    root = host.base
    params = root / "sys/module/kvm_intel/parameters"
    (params / "tdx").unlink()  # build_host_root's TDX kernel; each root says its own
    if tdx_param is not None:
        (params / "tdx").write_text(f"{tdx_param}\n")
    elif kvm_intel_loaded:
        (params / "ept").write_text("Y\n")
    else:
        params.rmdir()
        (root / "sys/module/kvm_intel").rmdir()
    (root / "proc/sys/kernel").mkdir(parents=True)
    (root / "proc/sys/kernel/osrelease").write_text(f"{kernel}\n")
    if config is not None:
        (root / "boot").mkdir()
        (root / f"boot/config-{kernel}").write_text(
            "".join(f"CONFIG_{k}={v}\n" for k, v in config.items()) + "# CONFIG_HYPERV is not set\n")
    if packages is not None:
        (root / "var/lib/dpkg").mkdir(parents=True)
        (root / "var/lib/dpkg/status").write_text(_status(packages))
    if not tdx_firmware:
        firmware = root / "usr/share/qemu/firmware"
        firmware.mkdir(parents=True)
        (firmware / "60-edk2-x86_64.json").write_text(json.dumps(DEBIAN12_FIRMWARE))
    for program in programs:
        _tripwire(root, program)
    return host


def forky_root(path: Path, **changes) -> HostRoot:
    """Debian forky-like: Linux 6.17 with KVM TDX on, QEMU 10.1, libvirt 11.8, ovmf-inteltdx."""
    options = dict(kernel=FORKY_KERNEL, tdx_param="Y", tdx_firmware=True,
                   config={"KVM": "m", "KVM_INTEL": "m", "INTEL_TDX_HOST": "y", "KVM_INTEL_TDX": "y"},
                   packages={"qemu-system-x86": "1:10.1.2+ds-1", "libvirt-daemon-driver-qemu": "11.8.0-1",
                             "ovmf-inteltdx": "2025.08-1"})
    options.update(changes)
    return make_root(path, **options)


def debian12_root(path: Path) -> HostRoot:
    """Debian 12-like: Linux 6.1 (no TDX), QEMU 7.2, libvirt 9.0, OVMF without TDX."""
    return make_root(path, kernel=DEBIAN12_KERNEL, kvm_intel_loaded=True,
                     config={"KVM": "m", "KVM_INTEL": "m"},
                     packages={"qemu-system-x86": "1:7.2+dfsg-7+deb12u7",
                               "libvirt-daemon-driver-qemu": "9.0.0-4", "ovmf": "2022.11-6+deb12u1"})


def _states(report: distro.Report) -> dict[str, str]:
    return {f.component: f.state for f in report.findings}


def _never_ran(host: HostRoot) -> None:
    assert not (host.base / "RAN").exists(), "a program below the host root was run"


# --- the facts, read below fake roots -----------------------------------------------

def test_a_forky_like_root_has_everything(tmp_path):
    host = forky_root(tmp_path / "root")
    report = distro.check(host)
    assert _states(report) == {"kernel": "present", "qemu": "present", "libvirt": "present",
                               "ovmf": "present"}
    assert report.get("kernel").detail == (f"running kernel {FORKY_KERNEL}: kvm_intel's tdx "
                                           "parameter is Y")
    assert report.get("qemu").detail == ("package qemu-system-x86 1:10.1.2+ds-1 (/var/lib/dpkg/status): "
                                         ">= 10.1, has tdx-guest")
    assert report.get("libvirt").detail == ("package libvirt-daemon-driver-qemu 11.8.0-1: 11.8.0 >= 11.6 "
                                            "(native TDX); GPU hostdevs through iommufd need 12.1")
    assert report.get("ovmf").detail == ("/usr/share/ovmf/OVMF.inteltdx.ms.fd (a QEMU firmware "
                                         "descriptor lists it with intel-tdx)")
    assert not any(f.planned for f in report.findings)
    assert report.root == str(host.base)
    _never_ran(host)


def test_a_debian12_like_root_has_nothing(tmp_path):
    host = debian12_root(tmp_path / "root")
    report = distro.check(host)
    assert _states(report) == {"kernel": "missing", "qemu": "missing", "libvirt": "missing",
                               "ovmf": "missing"}
    assert report.get("kernel").detail == (f"running kernel {DEBIAN12_KERNEL}: /boot/config-"
                                           f"{DEBIAN12_KERNEL} does not set CONFIG_INTEL_TDX_HOST=y")
    assert report.get("qemu").detail == ("package qemu-system-x86 1:7.2+dfsg-7+deb12u7 "
                                         "(/var/lib/dpkg/status): < 10.1, no tdx-guest")
    assert report.get("libvirt").detail.startswith(
        "package libvirt-daemon-driver-qemu 9.0.0-4: 9.0.0 < 11.6 (no native TDX); tdxvirt build "
        "does not build libvirt: install libvirt >= 11.6")
    assert report.get("ovmf").detail.startswith("no QEMU firmware descriptor with feature intel-tdx")
    # libvirt is reported, never planned: tdxvirt build does not build it
    assert [f.component for f in report.findings if f.planned] == ["kernel", "qemu", "ovmf"]
    _never_ran(host)


def test_mixed_roots(tmp_path):
    # trixie-like: a 6.12 kernel with the TDX host core but no KVM TDX, QEMU 10.0,
    # libvirt 11.3, and the TDX firmware
    trixie = make_root(tmp_path / "trixie", kernel="6.12.57+deb13-amd64", tdx_firmware=True,
                       config={"KVM": "m", "KVM_INTEL": "m", "INTEL_TDX_HOST": "y"},
                       packages={"qemu-system-x86": "1:10.0.2+ds-2", "libvirt-daemon": "11.3.0-3"})
    report = distro.check(trixie)
    assert _states(report) == {"kernel": "unknown", "qemu": "missing", "libvirt": "missing",
                               "ovmf": "present"}
    assert ("sets CONFIG_INTEL_TDX_HOST=y, but Linux 6.12 predates KVM's TDX (6.16): only a patched "
            "kernel runs TDs; load kvm_intel to tell by its tdx parameter") in report.get("kernel").detail
    assert [f.component for f in report.findings if f.planned] == ["kernel", "qemu"]  # unknown is planned

    # the same, kvm_intel loaded without a tdx parameter: its KVM has no TDX
    loaded = make_root(tmp_path / "trixie-loaded", kernel="6.12.57+deb13-amd64", kvm_intel_loaded=True,
                       config={"INTEL_TDX_HOST": "y"})
    assert distro.check(loaded).get("kernel").state == "missing"
    assert "kvm_intel is loaded without a tdx parameter" in distro.check(loaded).get("kernel").detail

    # forky, but QEMU still 10.0 and libvirt 12.1: only QEMU is missing
    older_qemu = forky_root(tmp_path / "qemu", packages={"qemu-system-x86": "1:10.0.2+ds-2",
                                                         "libvirt-daemon-driver-qemu": "12.1.0-1"})
    report = distro.check(older_qemu)
    assert [f.component for f in report.findings if f.planned] == ["qemu"]
    assert report.get("libvirt").detail == "package libvirt-daemon-driver-qemu 12.1.0-1: 12.1.0 >= 11.6 (native TDX)"

    # TDX turned off (kvm_intel's tdx is N) is still a kernel with TDX: nothing to build
    off = forky_root(tmp_path / "off", tdx_param="N", config=None)
    assert distro.check(off).get("kernel").state == "present"
    assert "now N: `tdxvirt host setup` turns it on" in distro.check(off).get("kernel").detail

    # the source document's patched 6.9 kernel: its tdx parameter tells
    patched = forky_root(tmp_path / "patched", kernel="6.9.0-rc7-tdx", tdx_param="Y",
                         config={"INTEL_TDX_HOST": "y"})
    assert distro.check(patched).get("kernel").state == "present"

    # 6.16+ built without KVM_INTEL_TDX: missing, whatever INTEL_TDX_HOST says
    no_kvm_tdx = forky_root(tmp_path / "nokvmtdx", tdx_param=None, config={"INTEL_TDX_HOST": "y"})
    assert distro.check(no_kvm_tdx).get("kernel").state == "missing"

    # a descriptor naming firmware that is not there
    gone = forky_root(tmp_path / "gone")
    (gone.base / "usr/share/ovmf/OVMF.inteltdx.ms.fd").unlink()
    assert distro.check(gone).get("ovmf").state == "missing"
    assert "names /usr/share/ovmf/OVMF.inteltdx.ms.fd, which is not there" in distro.check(gone).get("ovmf").detail
    for host in (trixie, loaded, older_qemu, off, patched, no_kvm_tdx, gone):
        _never_ran(host)


def test_below_a_root_facts_come_from_files_or_are_unknown(tmp_path):
    # QEMU and libvirt there, but no package status: not run, so unknown
    host = forky_root(tmp_path / "root", packages=None)
    report = distro.check(host)
    assert report.get("qemu").state == "unknown"
    assert report.get("qemu").detail == (f"/usr/bin/qemu-system-x86_64 is there but is not run below "
                                         f"host root {host.base}, and no qemu-system-x86 package is "
                                         "recorded in /var/lib/dpkg/status")
    assert report.get("libvirt").state == "unknown"
    assert "/usr/sbin/virtqemud is not run below host root" in report.get("libvirt").detail
    # neither a program nor a package: missing
    bare = forky_root(tmp_path / "bare", packages=None, programs=())
    assert _states(distro.check(bare))["qemu"] == "missing"
    assert _states(distro.check(bare))["libvirt"] == "missing"
    # no kvm_intel and no kernel config to read: unknown
    blind = forky_root(tmp_path / "blind", tdx_param=None, config=None)
    assert distro.check(blind).get("kernel").state == "unknown"
    # the default runner for a root other than / runs nothing; so does an explicit refusal
    refusing = RefusingRunner(host)
    distro.check(host, refusing)
    assert refusing.calls == []
    _never_ran(host)


def test_on_slash_qemu_and_libvirt_are_asked(tmp_path):
    """For the host root / the programs run: a recording runner stands in for them."""
    host = forky_root(tmp_path / "root", packages=None)
    qemu, daemon = "/usr/bin/qemu-system-x86_64", "/usr/sbin/virtqemud"
    runner = RecordingRunner({
        (qemu, "-object", "help"): (0, "List of user creatable objects:\n  memory-backend-ram\n  tdx-guest\n", ""),
        (daemon, "--version"): (0, "virtqemud (libvirt) 12.1.0\n", ""),
    })
    report = distro.check(host, runner)
    assert runner.calls == [[qemu, "-object", "help"], [daemon, "--version"]]
    assert report.get("qemu").detail == f"{qemu} lists tdx-guest (-object help)"
    assert report.get("libvirt").detail == f"`{daemon} --version`: 12.1.0 >= 11.6 (native TDX)"

    old = RecordingRunner({(qemu, "-object", "help"): (0, "List of user creatable objects:\n  sev-guest\n", ""),
                           (daemon, "--version"): (0, "virtqemud (libvirt) 10.10.0\n", "")})
    report = distro.check(host, old)
    assert _states(report)["qemu"] == "missing" and _states(report)["libvirt"] == "missing"
    broken = RecordingRunner({(qemu, "-object", "help"): (1, "", "qemu: cannot open /dev/kvm")})
    assert distro.check(host, broken).get("qemu").state == "unknown"
    assert "failed: qemu: cannot open /dev/kvm" in distro.check(host, broken).get("qemu").detail
    _never_ran(host)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400))
def test_any_dpkg_status_file_is_read_without_error(tmp_path, data):
    root = tmp_path / "any"
    (root / "var/lib/dpkg").mkdir(parents=True, exist_ok=True)
    (root / "var/lib/dpkg/status").write_bytes(b"Package: qemu-system-x86\n" + data)
    report = distro.check(HostRoot(root))
    assert {f.state for f in report.findings} <= {"present", "missing", "unknown"}
    assert all(f.detail.isprintable() for f in report.findings)


def test_what_a_root_says_is_shown_escaped(tmp_path):
    host = forky_root(tmp_path / "root", packages={"qemu-system-x86": "10.1\x1b]0;pwned\x07-1"})
    detail = distro.check(host).get("qemu").detail
    assert "\x1b" not in detail and "\\x1b]0;pwned\\x07-1" in detail


def test_a_nul_in_the_manifest_path_is_a_one_line_error():
    import pytest

    from tdxvirt.build import manifest
    from tdxvirt.errors import InputError

    with pytest.raises(InputError, match="not a usable path"):
        manifest.load("bad\0name.toml")


def test_debian_versions():
    assert distro.debian_upstream_version("1:10.1.0+ds-5ubuntu2") == (10, 1, 0)
    assert distro.debian_upstream_version("11.6.0-1~bpo13+1") == (11, 6, 0)
    assert distro.debian_upstream_version("10.2") == (10, 2, 0)
    assert distro.debian_upstream_version("git20250101") is None
    assert distro.kernel_version("6.18.44-fc-v1045") == (6, 18)
    assert distro.kernel_version(None) is None


# --- through the CLI ----------------------------------------------------------------

def _cli(root: HostRoot, *args: str):
    result = CliRunner().invoke(main, ["--host-root", str(root.base), "build", *args])
    return result


def test_cli_nothing_to_build_is_a_full_answer(tmp_path):
    host = forky_root(tmp_path / "root")
    workdir = tmp_path / "work"
    result = _cli(host, "plan", "--workdir", str(workdir))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"What this host has from its distribution (host root {host.base}):"
    assert lines[1] == f"    kernel   has it   running kernel {FORKY_KERNEL}: kvm_intel's tdx parameter is Y"
    assert lines[2].startswith("    qemu     has it   package qemu-system-x86 1:10.1.2+ds-1")
    assert lines[3].startswith("    libvirt  has it   package libvirt-daemon-driver-qemu 11.8.0-1")
    assert lines[4].startswith("    ovmf     has it   /usr/share/ovmf/OVMF.inteltdx.ms.fd")
    assert lines[5:] == ["Nothing to build: this host has kernel, QEMU and OVMF with TDX "
                         "(--all plans them anyway)"]
    data = json.loads(_cli(host, "plan", "--workdir", str(workdir), "--json").output)
    assert data["planned"] == [] and data["steps"] == [] and data["artifacts"] == {}
    assert data["selected"] == ["kernel", "qemu", "ovmf"] and data["all"] is False
    assert [c["state"] for c in data["distribution"]["components"]] == ["present"] * 4
    # one component asked for, and the host has it
    only = _cli(host, "plan", "qemu", "--workdir", str(workdir))
    assert only.output.splitlines()[-1] == "Nothing to build: this host has QEMU with TDX (--all plans them anyway)"
    # run: the same answer, and nothing is created
    run = _cli(host, "run", "--workdir", str(workdir))
    assert run.exit_code == 0 and "Nothing to build" in run.output
    assert not workdir.exists()
    _never_ran(host)


def test_cli_plans_everything_on_a_debian12_like_host(tmp_path):
    host = debian12_root(tmp_path / "root")
    workdir = tmp_path / "work"
    result = _cli(host, "plan", "--workdir", str(workdir), "-j", "2")
    assert result.exit_code == 0, result.output
    assert "Planned: kernel, qemu, ovmf (what this host lacks or cannot tell; --all plans every component)" \
        in result.output
    assert "    libvirt  missing  package libvirt-daemon-driver-qemu 9.0.0-4" in result.output
    assert "[1/9] kernel fetch (to do)" in result.output and "[9/9] ovmf build (to do)" in result.output
    # the running kernel's config is the base (the Debian 12 root's own)
    assert f"copy {host.base}/boot/config-{DEBIAN12_KERNEL} -> {workdir}/src/kernel/.config" in result.output
    assert not workdir.exists()
    _never_ran(host)


def test_cli_plans_only_what_a_mixed_host_lacks(tmp_path):
    host = forky_root(tmp_path / "root", packages={"qemu-system-x86": "1:10.0.2+ds-2",
                                                   "libvirt-daemon-driver-qemu": "11.8.0-1"})
    workdir = tmp_path / "work"
    result = _cli(host, "plan", "--workdir", str(workdir), "-j", "2")
    assert result.exit_code == 0, result.output
    assert "    qemu     missing  package qemu-system-x86 1:10.0.2+ds-2 (/var/lib/dpkg/status): < 10.1" \
        in result.output
    assert "Planned: qemu (what this host lacks" in result.output
    steps = [line for line in result.output.splitlines() if line.startswith("[")]
    assert steps == ["[1/3] qemu fetch (to do)", "[2/3] qemu configure (to do)", "[3/3] qemu build (to do)"]
    assert "kernel" not in "\n".join(steps) and "ovmf OVMF.fd" not in result.output
    # --all plans every component anyway
    every = _cli(host, "plan", "--workdir", str(workdir), "-j", "2", "--all", "--json")
    data = json.loads(every.output)
    assert data["planned"] == ["kernel", "qemu", "ovmf"] and data["all"] is True
    assert [s["component"] for s in data["steps"]].count("kernel") == 3
    # a manifest without the missing component: nothing planned, and said so
    only_kernel = tmp_path / "k.toml"
    only_kernel.write_text("[kernel]\nurl = 'https://example.org/linux.git'\nref = 'v6.18'\n")
    absent = _cli(host, "plan", "--manifest", str(only_kernel), "--workdir", str(workdir))
    assert absent.exit_code == 0, absent.output
    assert "Nothing to build: this host has kernel with TDX" in absent.output
    assert "Not planned: qemu (missing here, but the manifest has no table for it)" in absent.output
    _never_ran(host)
