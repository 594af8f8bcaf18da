"""Reading and replacing host files safely.

A replaced file is written to a temporary file in the same directory, flushed, given
the original's mode, owner and extended attributes (an SELinux label), then renamed
over the original: a reader sees the old file or the new one, never half of one, and
a write that fails (disk full, permission) leaves the original untouched. Symlinks are
never followed: tdxvirt edits the regular file it was asked to, or refuses.

``HostFiles`` reaches files below a host root the same way all the way down: from the
root's directory, one component at a time with ``O_NOFOLLOW | O_DIRECTORY``, then
reads and writes relative to the last directory's descriptor. A symlinked directory
anywhere below the root (``/etc/modprobe.d`` pointing elsewhere) is refused, never
followed, and when tdxvirt runs as root it writes only below directories that root
owns and no group or other user can change (anyone who can rename a directory on the
way can redirect a write). The path-based functions (``atomic_write`` and friends)
check only the last component, for callers that name a file directly.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import HostNotReadyError
from ..host import trust
from ..host.root import HostRoot

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_DIR_NOFOLLOW = _DIR | os.O_NOFOLLOW
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# The files setup edits are a few KiB (qemu.conf, GRUB's defaults, modprobe.d, udev,
# the hook, Fabric Manager's settings): anything larger is not one of them.
READ_LIMIT = 4 << 20


@dataclass(frozen=True)
class FileState:
    data: bytes
    mode: int  # permission bits
    uid: int
    gid: int


def _refuse_special(path: Path | str, st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise HostNotReadyError(
            f"{path} is a symlink; tdxvirt only edits regular files and never follows "
            "links: edit the file it points to by hand, or replace the link with a file"
        )
    if not stat.S_ISREG(st.st_mode):
        raise HostNotReadyError(f"{path} is not a regular file; fix it by hand and retry")


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _read_at(dir_fd: int, name: str, shown: Path | str) -> FileState | None:
    st = _lstat_at(dir_fd, name)
    if st is None:
        return None
    _refuse_special(shown, st)
    try:
        # O_NONBLOCK: a FIFO swapped in after the lstat does not hang the read.
        fd = os.open(name, _READ, dir_fd=dir_fd)
    except OSError as error:
        raise HostNotReadyError(f"cannot read {shown}: {error.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(handle.fileno())
        _refuse_special(shown, st)
        data = handle.read(READ_LIMIT + 1)
    if len(data) > READ_LIMIT:
        raise HostNotReadyError(f"{shown} is larger than {READ_LIMIT >> 20} MiB, which none of the "
                                "files host setup edits is; check it by hand and retry")
    return FileState(data, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)


def _copy_xattrs(dir_fd: int, name: str, fd: int) -> None:
    try:
        source = os.open(name, _READ, dir_fd=dir_fd)
    except OSError:
        return
    try:
        try:
            names = os.listxattr(source)
        except OSError:
            return
        for attribute in names:
            try:
                os.setxattr(fd, attribute, os.getxattr(source, attribute))
            except OSError:
                pass  # e.g. a trusted.* attribute on a file system without it
    finally:
        os.close(source)


def _write_at(dir_fd: int, name: str, data: bytes, new_mode: int, shown: Path | str) -> None:
    """Replace (or create) ``name`` in the directory ``dir_fd`` atomically."""
    st = _lstat_at(dir_fd, name)
    if st is not None:
        _refuse_special(shown, st)
    mode = stat.S_IMODE(st.st_mode) if st is not None else new_mode
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    created = False  # on failure, remove the temporary file only if this run made it
    try:
        # O_EXCL | O_NOFOLLOW: never write through a planted file or link; a name that
        # exists (a killed run's leftover, or anyone's) is never deleted: another is taken.
        for attempt in range(100):
            temp = f".{name}.tdxvirt-{os.getpid()}-{secrets.token_hex(4)}.tmp"
            try:
                fd = os.open(temp, flags, 0o600, dir_fd=dir_fd)
                break
            except FileExistsError:
                if attempt == 99:
                    raise
        created = True
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            if st is not None:
                _copy_xattrs(dir_fd, name, fd)
                if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                    os.fchown(fd, st.st_uid, st.st_gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    except OSError as error:
        if created:
            try:
                os.unlink(temp, dir_fd=dir_fd)
            except OSError:
                pass
        reason = error.strerror or errno.errorcode.get(error.errno or 0, str(error))
        raise HostNotReadyError(
            f"could not write {shown}: {reason}; the original file is unchanged"
        ) from None


def _remove_at(dir_fd: int, name: str, shown: Path | str) -> None:
    st = _lstat_at(dir_fd, name)
    if st is None:
        return
    _refuse_special(shown, st)
    try:
        os.unlink(name, dir_fd=dir_fd)
        os.fsync(dir_fd)
    except FileNotFoundError:
        pass
    except OSError as error:
        raise HostNotReadyError(f"could not remove {shown}: {error.strerror}") from None


# --- a file named by its path (only its last component is checked) ---------------------

@contextmanager
def _parent(path: Path, verb: str) -> Iterator[int | None]:
    try:
        dir_fd = os.open(path.parent, _DIR)
    except FileNotFoundError:
        if verb != "write":
            yield None
            return
        raise HostNotReadyError(f"cannot write {path}: its directory {path.parent} is not "
                                "usable (No such file or directory)") from None
    except OSError as error:
        raise HostNotReadyError(f"cannot {verb} {path}: its directory {path.parent} is not "
                                f"usable ({error.strerror})") from None
    try:
        yield dir_fd
    finally:
        os.close(dir_fd)


def read_state(path: Path) -> FileState | None:
    """A file's bytes and metadata, None when it does not exist; symlinks refused."""
    path = Path(path)
    with _parent(path, "read") as dir_fd:
        return None if dir_fd is None else _read_at(dir_fd, path.name, path)


def read_bytes(path: Path) -> bytes | None:
    state = read_state(path)
    return None if state is None else state.data


def atomic_write(path: Path, data: bytes, new_mode: int = 0o644) -> None:
    """Replace (or create) ``path`` with ``data``; on any failure the original stays."""
    path = Path(path)
    with _parent(path, "write") as dir_fd:
        _write_at(dir_fd, path.name, data, new_mode, path)


def remove_file(path: Path) -> None:
    """Remove a file tdxvirt created (revert); a missing file is fine."""
    path = Path(path)
    with _parent(path, "remove") as dir_fd:
        if dir_fd is not None:
            _remove_at(dir_fd, path.name, path)


# --- files below a host root, never through a link --------------------------------------

def _parts(absolute: str) -> list[str]:
    parts = [p for p in absolute.split("/") if p]
    if not absolute.startswith("/") or any(p in (".", "..") for p in parts):
        raise HostNotReadyError(f"internal error: {absolute!r} is not a plain absolute host "
                                "path; please report this")
    return parts


class HostFiles:
    """Files below a host root, reached from the root's directory without following links.

    ``check_owner`` (default: when running as root) refuses to write below a directory
    that is not root's or that a group or other user can write.
    """

    def __init__(self, root: HostRoot, check_owner: bool | None = None):
        self.root = root
        self.check_owner = trust.as_root() if check_owner is None else check_owner

    def shown(self, absolute: str) -> Path:
        """Where a host path is on this machine (what messages name)."""
        return self.root.path(absolute)

    def _judge(self, fd: int, shown: Path | str) -> None:
        if not self.check_owner:
            return
        st = os.fstat(fd)
        owner = st.st_uid if st.st_uid != 0 else None
        writable = bool(st.st_mode & 0o022)
        if owner is None and not writable:
            return
        problem = trust.Problem(str(shown), owner, writable)
        raise HostNotReadyError(
            f"cannot write below {shown}: {problem.describe()}; as root tdxvirt writes host "
            "files only in directories that root owns and no group or other user can "
            f"change: `{problem.fix()}`, or make the change by hand")

    def _refuse_component(self, dir_fd: int, name: str, shown: Path,
                          error: OSError) -> HostNotReadyError:
        st = _lstat_at(dir_fd, name)
        if st is not None and stat.S_ISLNK(st.st_mode):
            try:
                target = f" (it points to {os.readlink(name, dir_fd=dir_fd)})"
            except OSError:
                target = ""
            return HostNotReadyError(
                f"{shown} is a symlink; tdxvirt never follows links below the host root "
                f"when it reads or writes host files{target}: replace the link with the "
                "directory itself, or make the change by hand")
        if st is not None and not stat.S_ISDIR(st.st_mode):
            return HostNotReadyError(f"{shown} is not a directory; fix it by hand and retry")
        return HostNotReadyError(f"cannot open {shown}: {error.strerror}")

    @contextmanager
    def directory(self, absolute: str, *, write: bool, create: int | None = None
                  ) -> Iterator[int | None]:
        """A descriptor of the directory ``absolute`` below the root, or None when it
        (or a directory on the way) does not exist. ``create``: make what is missing,
        the last directory with that mode, any other with 0755. ``write``: judge every
        directory (the root's own too) as a place root writes to."""
        base = self.root.base
        try:
            fd = os.open(base, _DIR)  # the root itself is what the user named
        except OSError as error:
            raise HostNotReadyError(f"host root {base} is not usable ({error.strerror})") from None
        try:
            if write:
                self._judge(fd, base)
            parts = _parts(absolute)
            for index, part in enumerate(parts):
                shown = self.shown("/" + "/".join(parts[: index + 1]))
                mode = None if create is None else create if index == len(parts) - 1 else 0o755
                next_fd = self._open_below(fd, part, shown, mode)
                if next_fd is None:
                    break
                os.close(fd)
                fd = next_fd
                if write:
                    self._judge(fd, shown)
            else:
                yield fd
                return
            yield None
        finally:
            os.close(fd)

    def _open_below(self, fd: int, part: str, shown: Path, create: int | None) -> int | None:
        """The subdirectory ``part`` of ``fd`` (never through a link); None: missing."""
        try:
            return os.open(part, _DIR_NOFOLLOW, dir_fd=fd)
        except FileNotFoundError:
            if create is None:
                return None
        except OSError as error:
            raise self._refuse_component(fd, part, shown, error) from None
        try:
            os.mkdir(part, create, dir_fd=fd)
        except FileExistsError:
            pass
        except OSError as error:
            raise HostNotReadyError(f"cannot create {shown}: {error.strerror}") from None
        try:
            return os.open(part, _DIR_NOFOLLOW, dir_fd=fd)
        except OSError as error:
            raise self._refuse_component(fd, part, shown, error) from None

    @staticmethod
    def _split(absolute: str) -> tuple[str, str]:
        parent, _, name = absolute.rpartition("/")
        if not name or name in (".", ".."):
            raise HostNotReadyError(f"internal error: {absolute!r} names no file; please "
                                    "report this")
        return parent or "/", name

    def read_state(self, absolute: str) -> FileState | None:
        parent, name = self._split(absolute)
        with self.directory(parent, write=False) as fd:
            return None if fd is None else _read_at(fd, name, self.shown(absolute))

    def read_bytes(self, absolute: str) -> bytes | None:
        state = self.read_state(absolute)
        return None if state is None else state.data

    def is_dir(self, absolute: str) -> bool:
        """Whether a directory exists there (a symlink to one is refused, not followed)."""
        parent, name = self._split(absolute)
        with self.directory(parent, write=False) as fd:
            if fd is None:
                return False
            st = _lstat_at(fd, name)
            if st is not None and stat.S_ISLNK(st.st_mode):
                raise self._refuse_component(fd, name, self.shown(absolute),
                                             OSError(errno.ELOOP, "symlink"))
            return st is not None and stat.S_ISDIR(st.st_mode)

    def check_writable(self, absolute_dir: str) -> None:
        """Raise (one line) now if a write below ``absolute_dir`` would be refused: a
        symlink or a directory someone else controls on the way (missing ones are
        fine: they would be created)."""
        with self.directory(absolute_dir, write=True):
            pass

    def make_dir(self, absolute: str, mode: int) -> None:
        with self.directory(absolute, write=True, create=mode):
            pass

    def atomic_write(self, absolute: str, data: bytes, new_mode: int = 0o644,
                     dir_mode: int | None = None) -> None:
        """Replace or create the file; ``dir_mode``: create its directory if missing."""
        parent, name = self._split(absolute)
        with self.directory(parent, write=True, create=dir_mode) as fd:
            if fd is None:
                raise HostNotReadyError(f"cannot write {self.shown(absolute)}: its directory "
                                        f"{self.shown(parent)} does not exist")
            _write_at(fd, name, data, new_mode, self.shown(absolute))

    def remove_file(self, absolute: str) -> None:
        parent, name = self._split(absolute)
        with self.directory(parent, write=True) as fd:
            if fd is not None:
                _remove_at(fd, name, self.shown(absolute))
