"""Issue #18: host-file writes must not follow symlinked directories.

Performed attacks: ``etc/modprobe.d`` in the root is a symlink elsewhere (setup used
to say "create /etc/modprobe.d/tdxvirt.conf" and write the file elsewhere); a
symlinked directory in the backup tree (the qemu.conf backup used to land where the
link pointed). Nothing may be written outside, the user gets one line, the host is
left as it was. As root, directories someone else can change are refused too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_hostcfg_setup import QEMU_CONF, debian_host, snapshot
from test_sec_host_root import RECORDER, give_shell, invoke, one_line_error, plant

from tdxvirt.errors import HostNotReadyError
from tdxvirt.host import HostRoot
from tdxvirt.host.commands import RecordingRunner
from tdxvirt.hostcfg import apply
from tdxvirt.hostcfg.files import HostFiles
from tdxvirt.hostcfg.setup import SetupOptions, revert, setup

NOBODY = 65534
SETUP_STATE = apply.STATE.lstrip("/")


@pytest.fixture
def host(tmp_path) -> Path:
    """A Debian host whose update-grub and systemctl record that they ran (in the root)."""
    base = debian_host(tmp_path / "root")
    give_shell(base)
    plant(base, "/usr/sbin/update-grub", RECORDER)
    plant(base, "/usr/bin/systemctl", RECORDER)
    return base


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    target = tmp_path / "elsewhere"
    target.mkdir()
    target.chmod(0o755)
    return target


def everything(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def setup_cli(base: Path, *extra: str):
    return invoke("--host-root", str(base), "host", "setup", "--run-below-root", *extra)


# --- a symlinked /etc/modprobe.d -----------------------------------------------------------

def _link_modprobe_d(base: Path, elsewhere: Path) -> None:
    (base / "etc/modprobe.d").rmdir()
    (base / "etc/modprobe.d").symlink_to(elsewhere)


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_symlinked_modprobe_d_is_refused_in_one_line(host, elsewhere, dry_run):
    _link_modprobe_d(host, elsewhere)
    before = snapshot(host)
    line = one_line_error(setup_cli(host, *(["--dry-run"] if dry_run else [])), 1)
    assert line == (
        f"tdxvirt: error: {host}/etc/modprobe.d is a symlink; tdxvirt never follows links "
        f"below the host root when it reads or writes host files (it points to {elsewhere}): "
        "replace the link with the directory itself, or make the change by hand")
    assert everything(elsewhere) == []
    assert snapshot(host) == before and not (host / "ran").exists()
    assert not (host / SETUP_STATE).exists()


def test_the_library_refuses_it_before_running_anything(host, elsewhere):
    _link_modprobe_d(host, elsewhere)
    runner = RecordingRunner()
    with pytest.raises(HostNotReadyError, match="etc/modprobe.d is a symlink"):
        setup(HostRoot(host), runner, SetupOptions(), lambda step: None)
    assert runner.calls == [] and everything(elsewhere) == []


def test_a_symlinked_etc_is_refused_too(host, elsewhere):
    """Any directory on the way counts, not only the file's own."""
    (host / "etc").rename(elsewhere / "etc")
    (host / "etc").symlink_to(elsewhere / "etc")
    inside = everything(elsewhere)
    line = one_line_error(setup_cli(host), 1)
    assert f"{host}/etc is a symlink" in line
    assert everything(elsewhere) == inside  # nothing written there either


# --- the backup tree ------------------------------------------------------------------------

@pytest.mark.parametrize("linked", ["var/lib/tdxvirt", SETUP_STATE, f"{SETUP_STATE}/files"])
def test_a_symlinked_backup_directory_is_refused_before_any_change(host, elsewhere, linked):
    (host / linked).parent.mkdir(parents=True, exist_ok=True)
    (host / linked).symlink_to(elsewhere)
    before = snapshot(host)
    line = one_line_error(setup_cli(host), 1)
    assert f"{host}/{linked} is a symlink; tdxvirt never follows links" in line
    assert everything(elsewhere) == []
    assert snapshot(host) == before and not (host / "ran").exists()


def test_the_old_nested_backup_tree_can_redirect_nothing(host, elsewhere):
    """The reported attack: files/etc/libvirt -> elsewhere redirected qemu.conf's backup.
    Backups now have flat names in files/ alone, so that tree is never used."""
    nested = host / SETUP_STATE / "files/etc"
    nested.mkdir(parents=True)
    (nested / "libvirt").symlink_to(elsewhere)
    original = (host / QEMU_CONF).read_bytes()
    result = setup_cli(host)
    assert result.exit_code == 0, result.output
    assert everything(elsewhere) == []
    backups = host / SETUP_STATE / "files"
    assert (backups / "etc%2Flibvirt%2Fqemu.conf").read_bytes() == original
    assert (backups / "etc%2Flibvirt%2Fqemu.conf").stat().st_mode & 0o777 == 0o600
    manifest = json.loads((host / apply.MANIFEST.lstrip("/")).read_text())
    assert manifest["files"]["/etc/libvirt/qemu.conf"]["backup"] == "etc%2Flibvirt%2Fqemu.conf"
    assert setup_cli(host, "--revert").exit_code == 0
    assert (host / QEMU_CONF).read_bytes() == original and everything(elsewhere) == []


def test_a_backup_kept_by_an_older_tdxvirt_is_still_restored(tmp_path):
    """Manifests from before flat names keep the original under files/<host path>."""
    base = debian_host(tmp_path / "root")
    root = HostRoot(base)
    original = (base / QEMU_CONF).read_bytes()
    setup(root, RecordingRunner(), SetupOptions(), lambda step: None)
    state = base / SETUP_STATE
    assert state.stat().st_mode & 0o777 == 0o700  # created private, as before
    assert (state / "files").stat().st_mode & 0o777 == 0o700
    manifest = json.loads((state / "manifest.json").read_text())
    for path, record in manifest["files"].items():  # rewrite as the old layout had it
        if record.pop("backup", None):
            old = state / "files" / path.lstrip("/")
            old.parent.mkdir(parents=True, exist_ok=True)
            (state / "files" / apply.backup_name(path)).rename(old)
    (state / "manifest.json").write_text(json.dumps(manifest))
    revert(root, RecordingRunner(), lambda step: None)
    assert (base / QEMU_CONF).read_bytes() == original
    assert not (state / "manifest.json").exists()
    assert [p for p in (state / "files").rglob("*") if p.is_file()] == []


# --- directories someone else controls (tdxvirt runs as root here) --------------------------

@pytest.mark.parametrize("spoil", ["group-writable", "not root's"])
def test_a_directory_someone_else_controls_is_refused_before_any_change(host, spoil):
    libvirt = host / "etc/libvirt"
    if spoil == "group-writable":
        libvirt.chmod(0o775)
        fault, fix = "is writable by its group or others", f"`chmod go-w {libvirt}`"
    else:
        os.chown(libvirt, NOBODY, NOBODY)
        fault, fix = f"is owned by uid {NOBODY}, not root", f"`chown root {libvirt}`"
    before = snapshot(host)
    line = one_line_error(setup_cli(host), 1)
    assert line.startswith(f"tdxvirt: error: cannot write below {libvirt}: {libvirt} {fault}; ")
    assert fix in line
    assert snapshot(host) == before and not (host / "ran").exists()
    assert not (host / SETUP_STATE).exists()


def test_a_group_writable_backup_directory_is_refused(host):
    state = host / SETUP_STATE
    state.mkdir(parents=True)
    state.chmod(0o770)
    before = snapshot(host)
    line = one_line_error(setup_cli(host), 1)
    assert f"cannot write below {state}: {state} is writable by its group or others" in line
    assert snapshot(host) == before


def test_reads_and_writes_stay_below_the_root(tmp_path):
    base = tmp_path / "root"
    (base / "etc").mkdir(parents=True)
    base.chmod(0o755)
    files = HostFiles(HostRoot(base))
    files.atomic_write("/etc/x.conf", b"x\n")
    assert files.read_bytes("/etc/x.conf") == b"x\n"
    assert files.read_bytes("/etc/missing/x.conf") is None
    assert not files.is_dir("/etc/missing")
    with pytest.raises(HostNotReadyError, match="not a plain absolute host path"):
        files.read_bytes("/etc/../../x")
    with pytest.raises(HostNotReadyError, match="its directory .*/etc/none does not exist"):
        files.atomic_write("/etc/none/x.conf", b"x\n")
    files.make_dir("/var/lib/state", 0o700)
    assert (base / "var/lib").stat().st_mode & 0o777 == 0o755
    assert (base / "var/lib/state").stat().st_mode & 0o777 == 0o700
