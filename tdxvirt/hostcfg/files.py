"""Reading and replacing host files safely.

A replaced file is written to a temporary file in the same directory, flushed, given
the original's mode, owner and extended attributes (an SELinux label), then renamed
over the original: a reader sees the old file or the new one, never half of one, and
a write that fails (disk full, permission) leaves the original untouched. Symlinks are
never followed: tdxvirt edits the regular file it was asked to, or refuses.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import HostNotReadyError


@dataclass(frozen=True)
class FileState:
    data: bytes
    mode: int  # permission bits
    uid: int
    gid: int


def _refuse_special(path: Path, st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise HostNotReadyError(
            f"{path} is a symlink; tdxvirt only edits regular files and never follows "
            "links: edit the file it points to by hand, or replace the link with a file"
        )
    if not stat.S_ISREG(st.st_mode):
        raise HostNotReadyError(f"{path} is not a regular file; fix it by hand and retry")


def read_state(path: Path) -> FileState | None:
    """A file's bytes and metadata, None when it does not exist; symlinks refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    _refuse_special(path, st)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as error:
        raise HostNotReadyError(f"cannot read {path}: {error.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        data = handle.read()
    return FileState(data, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)


def read_bytes(path: Path) -> bytes | None:
    state = read_state(path)
    return None if state is None else state.data


def _copy_xattrs(source: Path, fd: int) -> None:
    try:
        names = os.listxattr(source, follow_symlinks=False)
    except OSError:
        return
    for name in names:
        try:
            os.setxattr(fd, name, os.getxattr(source, name, follow_symlinks=False))
        except OSError:
            pass  # e.g. a trusted.* attribute on a file system without it


def atomic_write(path: Path, data: bytes, new_mode: int = 0o644) -> None:
    """Replace (or create) ``path`` with ``data``; on any failure the original stays."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        _refuse_special(path, st)
    mode = stat.S_IMODE(st.st_mode) if st is not None else new_mode
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        raise HostNotReadyError(
            f"cannot write {path}: its directory {path.parent} is not usable "
            f"({error.strerror})") from None
    temp = f".{path.name}.tdxvirt-{os.getpid()}.tmp"
    try:
        try:
            # O_EXCL | O_NOFOLLOW: never write through a planted file or link.
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                         dir_fd=dir_fd)
        except FileExistsError:
            os.unlink(temp, dir_fd=dir_fd)  # left by a killed run of ours (same pid reused)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                         dir_fd=dir_fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            if st is not None:
                _copy_xattrs(path, fd)
                if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                    os.fchown(fd, st.st_uid, st.st_gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.rename(temp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    except OSError as error:
        try:
            os.unlink(temp, dir_fd=dir_fd)
        except OSError:
            pass
        reason = error.strerror or errno.errorcode.get(error.errno or 0, str(error))
        raise HostNotReadyError(
            f"could not write {path}: {reason}; the original file is unchanged"
        ) from None
    finally:
        os.close(dir_fd)


def remove_file(path: Path) -> None:
    """Remove a file tdxvirt created (revert); a missing file is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    _refuse_special(path, st)
    try:
        os.unlink(path)
    except OSError as error:
        raise HostNotReadyError(f"could not remove {path}: {error.strerror}") from None
