"""Atomic writes: metadata kept, links never followed, real faults leave the original."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tdxvirt.errors import HostNotReadyError
from tdxvirt.hostcfg.files import atomic_write, read_state, remove_file

NOBODY = 65534


def test_replace_keeps_mode_owner_and_xattrs_and_swaps_the_inode(tmp_path):
    path = tmp_path / "qemu.conf"
    path.write_bytes(b"old\n")
    os.chmod(path, 0o640)
    os.chown(path, NOBODY, NOBODY)
    try:
        os.setxattr(path, "user.tdxvirt-test", b"kept")
        xattrs = True
    except OSError:
        xattrs = False  # a file system without user xattrs
    inode = path.stat().st_ino
    atomic_write(path, b"new\n")
    st = path.stat()
    assert path.read_bytes() == b"new\n"
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o640, NOBODY, NOBODY)
    assert st.st_ino != inode  # renamed over, never rewritten in place
    if xattrs:
        assert os.getxattr(path, "user.tdxvirt-test") == b"kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qemu.conf"]


def test_new_file_gets_the_requested_mode(tmp_path):
    atomic_write(tmp_path / "tdxvirt.conf", b"x\n", new_mode=0o644)
    assert (tmp_path / "tdxvirt.conf").stat().st_mode & 0o7777 == 0o644


def test_symlinks_are_refused_and_their_target_untouched(tmp_path):
    target = tmp_path / "real.conf"
    target.write_bytes(b"target\n")
    link = tmp_path / "qemu.conf"
    link.symlink_to(target)
    for action in (lambda: atomic_write(link, b"evil\n"), lambda: read_state(link),
                   lambda: remove_file(link)):
        with pytest.raises(HostNotReadyError, match="is a symlink"):
            action()
    assert target.read_bytes() == b"target\n" and link.is_symlink()


def test_a_planted_temporary_link_is_not_written_through(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_bytes(b"victim\n")
    path = tmp_path / "qemu.conf"
    path.write_bytes(b"old\n")
    names = iter(["aaaaaaaa", "bbbbbbbb"])  # the first temporary name is taken by a link
    monkeypatch.setattr("tdxvirt.hostcfg.files.secrets.token_hex", lambda _: next(names))
    planted = tmp_path / f".qemu.conf.tdxvirt-{os.getpid()}-aaaaaaaa.tmp"
    planted.symlink_to(victim)
    atomic_write(path, b"new\n")
    assert path.read_bytes() == b"new\n" and victim.read_bytes() == b"victim\n"
    assert planted.is_symlink()  # a name someone else made is never deleted


def test_a_directory_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(HostNotReadyError, match="not a regular file"):
        atomic_write(tmp_path / "d", b"x")


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(HostNotReadyError, match="its directory .* is not usable"):
        atomic_write(tmp_path / "no/such/dir/file", b"x")


_CHILD = """
import resource, signal, sys
from pathlib import Path
from tdxvirt.errors import HostNotReadyError
from tdxvirt.hostcfg.files import atomic_write
if sys.argv[2] == "nobody":  # imports done as root (/root's Python), then drop to nobody
    import os
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
if sys.argv[2] == "fsize":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # get EFBIG instead of dying
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    atomic_write(Path(sys.argv[1]), b"n" * 100000)
except HostNotReadyError as error:
    print(error)
    sys.exit(3)
"""


@pytest.fixture
def shared_dir():
    """A directory another user can reach (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="tdxvirt-files-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def _original(directory: Path) -> Path:
    path = directory / "qemu.conf"
    path.write_bytes(b"original\n")
    os.chmod(path, 0o644)
    return path


def test_a_write_that_runs_out_of_space_leaves_the_original(shared_dir):
    path = _original(shared_dir)
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path), "fsize"],
                          capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    assert done.stdout.strip() == (f"could not write {path}: File too large; "
                                   "the original file is unchanged")
    assert path.read_bytes() == b"original\n"
    assert [p.name for p in shared_dir.iterdir()] == ["qemu.conf"]  # no temporary left


def test_a_write_without_permission_leaves_the_original(shared_dir):
    path = _original(shared_dir)
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path), "nobody"],
                          capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    assert "Permission denied; the original file is unchanged" in done.stdout
    assert path.read_bytes() == b"original\n"


def test_a_file_larger_than_any_setup_edits_is_refused_unread(tmp_path):
    from tdxvirt.hostcfg import files

    huge = tmp_path / "qemu.conf"
    with open(huge, "wb") as out:
        out.truncate(files.READ_LIMIT + 1)  # sparse: no disk used
    with pytest.raises(HostNotReadyError, match="larger than 4 MiB"):
        files.read_bytes(huge)
