"""Which files ``undefine --remove-storage`` may delete (issue #14).

The paths come from the domain XML, which anyone allowed to edit domains can change
(``virsh metadata --set``, members of the libvirt group), while tdxvirt often runs as
root. So a recorded path is a claim, never an instruction: a file is deleted only when
every rule below holds for it, and every recorded file is checked before any is deleted.

1. Local only: for a remote URI the files live on that host; nothing is deleted here.
2. The name: the recorded path must be exactly the path ``define`` would create for
   this domain now: ``<storage dir>/<name>.qcow2`` for the overlay and
   ``<storage dir>/<name>-seed.iso`` for the seed (tdxvirt.domain.policy.overlay_path,
   seed_path), where <storage dir> is the directory this machine's configuration
   picks (defaults.overlay_dir, else /var/lib/libvirt/images when it exists, else
   <state dir>/images: storage_dir below). The directory recorded in the
   metadata is not trusted: its only source is the XML. A path that is relative, has
   an added ``..`` or ``//``, or belongs to another name or directory fails this
   (a string comparison, before any file system access). Cost: after a domain
   rename or a change of overlay_dir the files are refused and are removed by hand;
   code that defines with an explicit Config must undefine with the same one.
3. In use: the path is still the ``<source file=...>`` of one of the domain's current
   disks, so metadata alone can never name a file: the overlay a ``device='disk'``,
   the seed a ``device='disk'`` (how td.xml.j2 attaches it: a read-only virtio disk)
   or ``device='cdrom'`` (how one would attach it by hand).
4. No symlinks: every directory from ``/`` down is opened with O_NOFOLLOW, and the
   entry itself is stat'ed without following, so neither the file nor any parent may
   be a symlink; the file must be a regular file.
5. Made by tdxvirt: ``define`` records every file it creates (path, device, inode) in
   this machine's state directory (``<state dir>/created``, root's, 0700), outside
   anything libvirt can edit; the file must be that very file (a file put at the name
   later is another inode), so a domain's XML and metadata alone never name a file
   to delete. Files defined before these records existed are refused: delete by hand.
6. The delete is ``unlinkat`` relative to the directory fd opened in 4: a symlink
   swapped in for a directory after the check cannot redirect it.

A recorded file that no longer exists is skipped: there is nothing to delete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, TdxvirtError

LIBVIRT_IMAGES = "/var/lib/libvirt/images"


def storage_dir(config) -> str:
    """The directory of this machine where tdxvirt creates overlays and seeds (config
    overlay_dir, else libvirt's images directory, else the state directory's); also the
    only directory `undefine --remove-storage` deletes from."""
    from ..paths import state_dir

    if config.overlay_dir:
        return config.overlay_dir
    return LIBVIRT_IMAGES if os.path.isdir(LIBVIRT_IMAGES) else str(state_dir() / "images")

def _record_of(path: str) -> Path:
    from ..paths import state_dir

    return state_dir() / "created" / hashlib.sha256(path.encode()).hexdigest()


def record_created(path: str, inode_of: str | None = None) -> None:
    """Remember that tdxvirt created ``path``: its device and inode, in a root-only
    record no domain edit can reach (rule 5). ``inode_of``: the private file about to be
    linked to ``path`` (recorded first, so a run killed between the two leaves a file
    the next run can prove is tdxvirt's and remove)."""
    record = _record_of(path)
    temporary = record.with_name(f".{record.name}.{os.getpid()}")
    try:
        status = os.stat(inode_of or path, follow_symlinks=False)
        record.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary.write_text(json.dumps({"path": path, "dev": status.st_dev, "ino": status.st_ino}))
        os.replace(temporary, record)
    except OSError as error:
        try:
            os.unlink(temporary)  # this run's own half-written record (a full disk): no litter
        except OSError:
            pass
        raise TdxvirtError(f"cannot record {path} as tdxvirt's in {record.parent} "
                           f"({error.strerror}); nothing was defined") from None


def forget_created(path: str) -> None:
    """Drop the record of a file tdxvirt removed (or never managed to create)."""
    try:
        _record_of(path).unlink()
    except FileNotFoundError:
        pass


def _created_by_tdxvirt(path: str, status: os.stat_result) -> bool:
    try:
        record = json.loads(_record_of(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("path") == path and \
        (record.get("dev"), record.get("ino")) == (status.st_dev, status.st_ino)


def remove_created(path: str) -> bool:
    """Delete ``path`` if it is still the very file tdxvirt recorded creating (rule 5),
    a regular file reached without symlinks (rules 4, 6); forget its record either way
    when it is gone. True when it was deleted. (An interrupted undefine's files, already
    checked against the domain then: tdxvirt.lifecycle.journal.)"""
    try:
        dir_fd = _open_parent(path)
    except OSError:
        return False
    try:
        try:
            status = os.stat(os.path.basename(path), dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            forget_created(path)
            return False
        if not stat.S_ISREG(status.st_mode) or not _created_by_tdxvirt(path, status):
            return False
        os.unlink(os.path.basename(path), dir_fd=dir_fd)
        forget_created(path)
        return True
    except OSError:
        return False
    finally:
        os.close(dir_fd)


# O_PATH: directories need no read permission to be walked; unlinkat accepts the fd.
_DIR_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _disk_files(xml: str) -> dict[str, set[str]]:
    """device ('disk', 'cdrom', ...) -> the source files of the domain's disks."""
    from .domainxml import DomainXML

    files: dict[str, set[str]] = {}
    for device, path in DomainXML.of(xml).disk_files():
        files.setdefault(device, set()).add(path)
    return files


def _open_parent(path: str) -> int:
    """An fd of the path's directory, reached from / without following any symlink
    (ELOOP/ENOTDIR when a component is a symlink or not a directory)."""
    fd = os.open("/", _DIR_FLAGS)
    try:
        for part in os.path.dirname(path).split("/"):
            if part:
                parent, fd = fd, os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(parent)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class _Removal:
    path: str
    dir_fd: int  # the checked directory; the delete is relative to it


class StorageRemoval:
    """The checked files of one domain, deleted by ``remove()``; a context manager
    that closes the directory fds it holds.

    Raises InputError, naming the first refused path and why, if any file fails a rule;
    then nothing has been deleted."""

    def __init__(self, name: str, xml: str, uri: str, recorded: dict[str, str | None],
                 config=None):
        """``recorded``: {'overlay': path or None, 'seed': path or None} from the metadata;
        ``config``: the tdxvirt Config whose overlay_dir applies (None: the config files)."""
        self.name = name
        self.removals: list[_Removal] = []
        recorded = {kind: path for kind, path in recorded.items() if path}
        if not recorded:
            return
        from ..virt.conn import is_remote

        if is_remote(uri):
            self._refuse(next(iter(recorded.values())),
                         f"{name!r} is defined at {uri}, a remote host, and tdxvirt deletes no "
                         "files there; storage on a remote host must be removed on that host")
        if config is None:  # loaded only when there is something to check
            from ..config import load_config

            config = load_config()
        directory = storage_dir(config)
        expected = {"overlay": f"{name}.qcow2", "seed": f"{name}-seed.iso"}
        devices = {"overlay": ("disk",), "seed": ("disk", "cdrom")}
        disks = _disk_files(xml)
        try:
            for kind, path in recorded.items():
                self._check(kind, path, os.path.join(directory, expected[kind]),
                            [f for device in devices[kind] for f in disks.get(device, ())])
        except BaseException:
            self.close()
            raise

    def _check(self, kind: str, path: str, expected: str, in_use: list[str]) -> None:
        if not os.path.isabs(path):
            self._refuse(path, f"the recorded {kind} is not an absolute path")
        if path != expected:
            self._refuse(path, f"it is not {expected}, the {kind} tdxvirt creates for "
                               f"{self.name!r} in its storage directory (defaults.overlay_dir)")
        try:
            dir_fd = _open_parent(path)
        except FileNotFoundError:
            return  # no directory, no file: nothing to delete
        except OSError as error:  # ELOOP: a symlink; ENOTDIR: not a directory
            self._refuse(path, f"a directory on its path is a symlink or not a directory "
                               f"({error.strerror})")
        try:
            status = os.stat(os.path.basename(path), dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            os.close(dir_fd)
            return
        mode = status.st_mode
        self.removals.append(_Removal(path, dir_fd))  # closed by close() from here on
        if stat.S_ISLNK(mode):
            self._refuse(path, "it is a symlink")
        if not stat.S_ISREG(mode):
            self._refuse(path, "it is not a regular file")
        if path not in in_use:
            self._refuse(path, f"it is not a disk of {self.name!r} any more (only a path in "
                               "the domain's current <disk><source file=...> is deleted)")
        if not _created_by_tdxvirt(path, status):
            self._refuse(path, "tdxvirt has no record of creating this file (another tool made "
                               "it, it was replaced since, or an older tdxvirt made it)")

    def _refuse(self, path: str, why: str):
        raise InputError(
            f"refusing to delete {path}: {why}; nothing was deleted and {self.name!r} is "
            f"still defined; to remove it anyway, delete the file by hand "
            f"(rm -- {shlex.quote(path)}) and run `tdxvirt undefine {shlex.quote(self.name)}` "
            "without --remove-storage")

    def remove(self) -> list[str]:
        """Delete the checked files; the paths deleted."""
        removed = []
        for removal in self.removals:
            try:
                os.unlink(os.path.basename(removal.path), dir_fd=removal.dir_fd)
            except FileNotFoundError:
                forget_created(removal.path)
                continue  # gone since the check
            except OSError as error:
                raise TdxvirtError(f"{self.name!r} is undefined but {removal.path} could not be "
                                   f"deleted ({error.strerror}); delete it by hand") from None
            forget_created(removal.path)
            removed.append(removal.path)
        return removed

    def close(self) -> None:
        for removal in self.removals:
            os.close(removal.dir_fd)
        self.removals = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
