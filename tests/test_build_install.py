"""`tdxvirt build install`: the built OVMF into a fake host root, its QEMU firmware
descriptor found as libvirt and tdxvirt find one, and --revert removing just that.

The builds are recorded by the real record code (steps.artifact_entry over a tree laid
out as edk2 lays out its output; steps.artifact_digests for QEMU); only the firmware
and the emulator are stand-in files. The root is a tmp folder: the install writes
below it exactly what it would write below /.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import pytest
from click.testing import CliRunner

from tdxvirt.build import artifacts, distro, install_record, steps
from tdxvirt.build import install as installer
from tdxvirt.build import manifest as manifests
from tdxvirt.cli import TdxvirtGroup
from tdxvirt.cli.build import build
from tdxvirt.host import HostRoot
from tdxvirt.host.firmware import find_tdx_ovmf

DESCRIPTOR = "/etc/qemu/firmware/59-tdxvirt-x86_64-inteltdx.json"
# QEMU's docs/interop/firmware.json: every member of Firmware is required
FIRMWARE_MEMBERS = {"description", "interface-types", "mapping", "targets", "features", "tags"}
FIRMWARE_FEATURES = {"acpi-s3", "acpi-s4", "amd-sev", "amd-sev-es", "amd-sev-snp", "intel-tdx",
                     "enrolled-keys", "requires-smm", "secure-boot", "host-uefi-vars",
                     "verbose-dynamic", "verbose-static"}


@pytest.fixture
def root(tmp_path) -> Path:
    """A host root with the distribution's TDX descriptor and an admin's own one."""
    base = tmp_path / "root"
    shipped = resources.files("tdxvirt.sim").joinpath("data/60-edk2-x86_64-inteltdx.json")
    (base / "usr/share/qemu/firmware").mkdir(parents=True)
    (base / "usr/share/qemu/firmware/60-edk2-x86_64-inteltdx.json").write_text(shipped.read_text())
    (base / "usr/share/ovmf").mkdir(parents=True)
    (base / "usr/share/ovmf/OVMF.inteltdx.ms.fd").write_bytes(b"distribution firmware")
    (base / "etc/qemu/firmware").mkdir(parents=True)
    (base / "etc/qemu/firmware/10-admin.json").write_text('{"description": "the admin\'s"}\n')
    return base


def record_ovmf(tmp_path: Path, state: Path, content: bytes = b"TDVF built\n" * 100) -> Path:
    """A built OVMF.fd where edk2 puts it, recorded as `build run ovmf` records it."""
    workdir = tmp_path / "work"
    tree = workdir / "src/ovmf"
    (tree / "OvmfPkg/IntelTdx").mkdir(parents=True, exist_ok=True)
    (tree / "OvmfPkg/IntelTdx/IntelTdxX64.dsc").write_text(
        "[Defines]\n  OUTPUT_DIRECTORY               = Build/IntelTdx\n")
    image = tree / "Build/IntelTdx/RELEASE_GCC/FV/OVMF.fd"
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(content)
    ctx = steps.Context(manifests.load(), workdir, 2, False, HostRoot("/"))
    artifacts.update(artifacts.record_file(state), "ovmf", steps.artifact_entry(ctx, "ovmf"))
    return image


def record_qemu(tmp_path: Path, state: Path) -> Path:
    binary = tmp_path / "work/src/qemu/build/qemu-system-x86_64"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\necho QEMU emulator version 10.2.0\n")
    binary.chmod(0o755)
    paths = {"qemu-system-x86_64": str(binary)}
    entry = {"ref": "v10.2.0", "artifacts": paths, "digests": steps.artifact_digests(paths, None, True)}
    artifacts.update(artifacts.record_file(state), "qemu", entry)
    return binary


def cli(*args):
    result = CliRunner().invoke(TdxvirtGroup(name="tdxvirt", commands={"build": build}),
                                ["build", "install", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def tree(base: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(base)): (p.read_bytes() if p.is_file() else None) for p in sorted(base.rglob("*"))}


def test_ovmf_install_writes_a_descriptor_libvirt_and_tdxvirt_find_and_revert_removes_it(tmp_path, state, root):
    image = record_ovmf(tmp_path, state)
    sha256 = artifacts.load(artifacts.record_file(state))["ovmf"]["digests"]["OVMF.fd"]["sha256"]
    copy = f"/usr/local/share/tdxvirt/firmware/{sha256}.fd"
    before = tree(root)

    dry = cli("ovmf", "--root", root, "--dry-run")
    assert dry.exit_code == 0, dry.output
    lines = dry.output.splitlines()
    assert lines[0] == "Dry run; install would:"
    assert lines[1] == f"    copy {image} -> {root}{copy} (sha256 {sha256}, mode 0644)"
    assert lines[2] == f"    write {root}{DESCRIPTOR} (mode 0644):"
    assert f'                "filename": "{copy}"' in lines
    assert f"    record what was written in {state}/build/installed.json" in lines
    assert tree(root) == before and not (state / "build/installed.json").exists()

    done = cli("ovmf", "--root", root)
    assert done.exit_code == 0, done.output
    assert f"copied {image} -> {root}{copy}" in done.output
    assert (root / copy.lstrip("/")).read_bytes() == image.read_bytes()
    assert stat.S_IMODE((root / DESCRIPTOR.lstrip("/")).stat().st_mode) == 0o644
    data = json.loads((root / DESCRIPTOR.lstrip("/")).read_text())
    # QEMU's schema: every member, the memory mapping a TD loads its firmware by (-bios)
    shipped = json.loads(resources.files("tdxvirt.sim").joinpath("data/60-edk2-x86_64-inteltdx.json").read_text())
    assert set(data) == FIRMWARE_MEMBERS == set(shipped)
    assert data["interface-types"] == ["uefi"]
    assert data["mapping"] == {"device": "memory", "filename": copy}
    assert data["targets"] == [{"architecture": "x86_64", "machines": ["pc-q35-*"]}]
    assert "intel-tdx" in data["features"] and set(data["features"]) <= FIRMWARE_FEATURES
    assert isinstance(data["description"], str) and data["tags"] == []
    # file-name order across both folders: before the distribution's 60-... descriptor
    host = HostRoot(root)
    assert find_tdx_ovmf(host) == copy
    finding = distro.check_ovmf(host)
    assert (finding.state, finding.detail) == ("present", f"{copy} (a QEMU firmware descriptor lists it with intel-tdx)")
    # a copy below another root is not this host's: define keeps the build tree's file
    assert artifacts.recorded(state)["ovmf"].path == str(image)

    again = cli("ovmf", "--root", root)
    assert again.exit_code == 0
    assert f"unchanged {root}{copy} (there already)" in again.output
    assert "copied" not in again.output

    dry_revert = cli("--revert", "--root", root, "--dry-run")
    assert dry_revert.exit_code == 0
    assert f"    remove {root}{DESCRIPTOR}" in dry_revert.output
    assert f"    remove folder {root}/usr/local (if empty then)" in dry_revert.output
    assert f"remove folder {root}/etc" not in dry_revert.output  # it was there before
    reverted = cli("--revert", "--root", root)
    assert reverted.exit_code == 0, reverted.output
    assert f"removed {root}{copy}" in reverted.output
    assert tree(root) == before  # the admin's and the distribution's files stay
    assert not (state / "build/installed.json").exists()
    assert cli("--revert", "--root", root).output.startswith("Nothing to revert")


def test_a_rebuild_gets_a_new_copy_and_the_descriptor_follows_it(tmp_path, state, root):
    record_ovmf(tmp_path, state, b"first build")
    assert cli("ovmf", "--root", root).exit_code == 0
    first = find_tdx_ovmf(HostRoot(root))
    record_ovmf(tmp_path, state, b"second build")
    result = cli("ovmf", "--root", root)
    assert result.exit_code == 0, result.output
    second = find_tdx_ovmf(HostRoot(root))
    assert second != first
    assert (root / first.lstrip("/")).read_bytes() == b"first build"  # a TD defined with it keeps it
    assert (root / second.lstrip("/")).read_bytes() == b"second build"
    assert cli("--revert", "--root", root).exit_code == 0
    assert not (root / "usr/local").exists()


def test_refusals_are_one_line_and_change_nothing(tmp_path, state, root):
    before = tree(root)
    nothing = cli("ovmf", "--root", root)
    assert nothing.exit_code == 2
    assert nothing.stderr == (f"tdxvirt: error: no OVMF was built: {state}/build/artifacts.json records "
                              "none; `tdxvirt build run ovmf` builds it\n")

    image = record_ovmf(tmp_path, state)
    image.write_bytes(b"replaced after the build")
    changed = cli("all", "--root", root)
    assert changed.exit_code == 2
    assert changed.stderr.startswith(f"tdxvirt: error: ovmf OVMF.fd: {image} changed since it was recorded")
    assert changed.stderr.rstrip().endswith("`tdxvirt build run ovmf` builds and records it again")
    assert len(changed.stderr.splitlines()) == 1

    record_ovmf(tmp_path, state)
    (root / DESCRIPTOR.lstrip("/")).write_text("{}\n")  # someone else's file at that name
    in_the_way = cli("ovmf", "--root", root)
    assert in_the_way.exit_code == 2
    assert in_the_way.stderr == (f"tdxvirt: error: {root}{DESCRIPTOR} exists and is not what `tdxvirt "
                                 "build install` wrote there (or changed since); nothing was installed; "
                                 "move it away and run it again\n")
    (root / DESCRIPTOR.lstrip("/")).unlink()
    assert tree(root) == before and not (state / "build/installed.json").exists()

    assert cli("ovmf", "--root", root).exit_code == 0
    (root / DESCRIPTOR.lstrip("/")).write_text("{}\n")  # edited after the install
    refused = cli("--revert", "--root", root)
    assert refused.exit_code == 2
    assert refused.stderr.startswith(f"tdxvirt: error: {root}{DESCRIPTOR} changed since `tdxvirt build "
                                     "install` wrote it (changed); nothing was removed")
    assert (root / "usr/local/share/tdxvirt/firmware").is_dir()


def test_install_without_root_is_refused_before_anything(tmp_path):
    base = Path(tempfile.mkdtemp(prefix="tdxvirt-noroot-"))  # outside root's private tmp_path
    os.chmod(base, 0o777)
    script = ("import sys; from tdxvirt.cli import TdxvirtGroup; from tdxvirt.cli.build import build; "
              "TdxvirtGroup(name='tdxvirt', commands={'build': build}).main(sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k != "TDXVIRT_STATE_DIR"}
    try:
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             sys.executable, "-c", script, "build", "install", "--root", str(base)],
            capture_output=True, text=True, env={**env, "HOME": str(base)}, cwd=base, check=False)
        assert os.listdir(base) == []
    finally:
        shutil.rmtree(base)
    assert result.returncode == 2, result.stderr
    assert result.stderr == ("tdxvirt: error: `tdxvirt build install` needs root (it writes /etc/qemu/firmware "
                             "and /usr/local/share/tdxvirt/firmware); run it with sudo, or add --dry-run to "
                             "see what it would write\n")


def test_qemu_is_checked_and_named_not_copied(tmp_path, state, root):
    binary = record_qemu(tmp_path, state)
    before = tree(root)
    result = cli("all", "--root", root, "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "Dry run; nothing to write:",
        "OVMF: not built, nothing to install",
        f"QEMU: nothing to write: `tdxvirt define` names {binary} as a new TD's <emulator> (--qemu or "
        "the config's qemu choose another); a domain defined before keeps its own: `virsh edit NAME` "
        "changes its <emulator>"]
    assert cli("qemu", "--root", root).exit_code == 0
    assert tree(root) == before and not (state / "build/installed.json").exists()
    binary.write_text("#!/bin/sh\necho another QEMU\n")
    changed = cli("qemu", "--root", root, "--dry-run")
    assert changed.exit_code == 2
    assert changed.stderr.startswith(f"tdxvirt: error: qemu qemu-system-x86_64: {binary} changed since")


def test_define_uses_the_installed_copy_of_the_build_it_would_use(tmp_path, state):
    image = record_ovmf(tmp_path, state)
    record = artifacts.load(artifacts.record_file(state))
    sha256 = record["ovmf"]["digests"]["OVMF.fd"]["sha256"]
    copy = tmp_path / f"{sha256}.fd"
    shutil.copyfile(image, copy)
    installed = {"ovmf": {"root": "/", "files": {}, "folders": [], "copies": {sha256: str(copy)}}}
    assert artifacts.builds(record, installed)["ovmf"].path == str(copy)
    assert artifacts.builds(record, {**installed, "ovmf": {**installed["ovmf"], "root": "/elsewhere"}}
                            )["ovmf"].path == str(image)
    install_record.save(install_record.record_file(state), installed)
    assert artifacts.recorded(state)["ovmf"].path == str(copy)
    assert artifacts.build_of(str(copy), state).component == "ovmf"  # `show`: the copy is that build
    copy.unlink()  # gone: the build tree's file again
    assert artifacts.recorded(state)["ovmf"].path == str(image)
    image.write_bytes(b"rebuilt")  # another build: its own copy is needed
    assert installer.install_record.copy_of(installed, "0" * 64) is None


def test_status_lists_what_install_wrote(tmp_path, state, root):
    record_ovmf(tmp_path, state)
    assert cli("ovmf", "--root", root).exit_code == 0
    status = CliRunner().invoke(TdxvirtGroup(name="tdxvirt", commands={"build": build}), ["build", "status"])
    assert f"installed: ovmf {root}{DESCRIPTOR}\n" in status.output
    (root / DESCRIPTOR.lstrip("/")).unlink()
    status = CliRunner().invoke(TdxvirtGroup(name="tdxvirt", commands={"build": build}), ["build", "status"])
    assert (f"installed: ovmf {root}{DESCRIPTOR} (missing: `tdxvirt build install ovmf` writes it again)"
            in status.output)


def test_a_folder_that_cannot_be_made_is_one_line_and_what_was_written_is_revertible(tmp_path, state, root):
    record_ovmf(tmp_path, state)
    shutil.rmtree(root / "etc/qemu")
    (root / "etc/qemu").write_text("a file where a folder belongs\n")
    result = cli("ovmf", "--root", root)
    assert result.exit_code != 0
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("tdxvirt: error: ")
    assert str(root / "etc/qemu") in result.stderr
    (root / "etc/qemu").unlink()
    assert cli("--revert", "--root", root).exit_code == 0
    assert not (root / "usr/local").exists()


def test_revert_keeps_a_firmware_copy_a_td_is_defined_with(tmp_path, state, root):
    """A TD's root-owned record names the installed copy as its firmware: removing it
    would leave that TD unable to start, so --revert refuses and removes nothing."""
    from tdxvirt.domain.record import TDRecord, local_store

    record_ovmf(tmp_path, state)
    assert cli("ovmf", "--root", root).exit_code == 0
    sha256 = artifacts.load(artifacts.record_file(state))["ovmf"]["digests"]["OVMF.fd"]["sha256"]
    copy = f"/usr/local/share/tdxvirt/firmware/{sha256}.fd"
    local_store().write(TDRecord(uuid="0b7c5f0e-4a43-4b1e-9d53-1c2f1b0b6a11", name="td-a",
                                 dialect="native", loader=copy))
    before = tree(root)
    refused = cli("--revert", "--root", root)
    assert refused.exit_code != 0
    line, = refused.output.strip().splitlines()
    assert copy in line and "td-a" in line and "nothing was removed" in line
    assert tree(root) == before
    local_store().remove("0b7c5f0e-4a43-4b1e-9d53-1c2f1b0b6a11")
    assert cli("--revert", "--root", root).exit_code == 0
