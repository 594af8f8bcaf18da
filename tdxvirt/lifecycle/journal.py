"""Intent records for changes that take more than one step, finished by whoever comes next.

``define`` with an overlay or seed is four steps (files, libvirt's define, root's
record) and ``undefine --remove-storage`` three (libvirt forgets the domain, tdxvirt
deletes the files it created, then its record). A tdxvirt (or libvirtd) killed between
them left litter: an overlay no domain used that blocked the re-run ("already
exists"), a private directory of qemu-img's, or an undefined domain's overlay for ever.
So before the first step an intent is written as root under ``<state dir>/journal``
(0700, each record 0600): the operation, the URI, the domain's UUID and name, the files
it creates or deletes, and the process doing it. The next ``define`` or ``undefine`` on
this machine (or ``host check``, which reports them) looks at what libvirt actually
holds, asked by the UUID, once that process is gone:

- undefine, the domain is gone: the undefine happened, so its files are deleted (each
  only if it is still the very file tdxvirt created, reached without symlinks, as
  tdxvirt.domain.storage_paths checks) and its record forgotten; the domain is still
  there: it never happened, everything stays;
- define, the domain is there: it was defined (a lost answer), everything stays; the
  domain is not there: the files it created (the same check) and its private
  directories (named after the UUID) are deleted, and its record if one was written;
- libvirt cannot be asked: nothing is decided, the intent waits for the next run.

A lost answer is never taken for a refusal or a success: libvirt is asked again.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import TdxvirtError


@dataclass(frozen=True)
class Intent:
    op: str  # "define" or "undefine"
    uri: str
    uuid: str
    name: str
    files: tuple[str, ...]  # created (define) or checked for deletion (undefine)
    owner: tuple[int, int] = (0, 0)  # the process doing it: pid and its start time


def this_process() -> tuple[int, int]:
    return os.getpid(), _started(os.getpid())


def _started(pid: int) -> int:
    """The process's start time in clock ticks since boot (0: no such process), so a
    recycled pid is not taken for the process that wrote an intent."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read(4096).rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return 0


def _running(owner: tuple[int, int]) -> bool:
    pid, started = owner
    return pid > 0 and pid != os.getpid() and started != 0 and _started(pid) == started


def private_prefix(uuid: str) -> str:
    """The name prefix of a define's private directories beside the files it creates."""
    return f".tdxvirt-{uuid}-"


def directory() -> Path:
    from ..paths import state_dir

    return state_dir() / "journal"


def begin(intent: Intent) -> Path:
    """Write the intent (atomically, fsynced) before the first step."""
    folder = directory()
    path = folder / f"{intent.op}-{intent.uuid}.json"
    temporary = folder / f".{path.name}.{os.getpid()}.tmp"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({**asdict(intent), "files": list(intent.files),
                       "owner": list(intent.owner)}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        try:
            os.unlink(temporary)  # this run's own temporary file
        except OSError:
            pass
        raise TdxvirtError(f"cannot write the intent record {path} ({error.strerror}); nothing "
                           "was changed") from None
    return path


def end(path: Path) -> None:
    try:
        os.unlink(path)  # an intent this module wrote, named from its own directory
    except FileNotFoundError:
        pass


def pending() -> list[tuple[Path, Intent]]:
    """The intents left by runs that did not finish (unreadable ones are skipped: they
    name nothing that could be acted on safely)."""
    folder = directory()
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if name.startswith(".") or not name.endswith(".json"):
            continue
        path = folder / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd) as handle:
                data = json.loads(handle.read(1 << 20))
            pid, started = data.get("owner", (0, 0))
            intent = Intent(str(data["op"]), str(data["uri"]), str(data["uuid"]), str(data["name"]),
                            tuple(str(f) for f in data["files"]), (int(pid), int(started)))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found.append((path, intent))
    return found


def recover() -> list[str]:
    """Finish or undo every pending intent whose process is gone, by asking libvirt;
    what was done, one line each."""
    from ..virt.conn import libvirt_error_type, open_connection
    from ..virt.lookup import _absent

    done = []
    for path, intent in pending():
        if intent.op not in ("define", "undefine") or _running(intent.owner):
            continue  # another tdxvirt is in the middle of it
        try:
            conn = open_connection(intent.uri)
        except TdxvirtError:
            continue  # cannot be asked now: the next run tries again
        try:
            try:
                conn.lookupByUUIDString(intent.uuid)
            except libvirt_error_type() as error:
                if not _absent(error):
                    continue
                done.append(_finish_undefine(intent) if intent.op == "undefine"
                            else _undo_define(intent))
            else:
                done.append(_kept(intent))
            end(path)
        finally:
            conn.close()
    return done


def _kept(intent: Intent) -> str:
    if intent.op == "undefine":
        return (f"{intent.name!r} is still defined: its interrupted undefine never happened, "
                "nothing was deleted")
    from ..domain.record import local_store

    try:
        recorded = local_store().read(intent.uuid) is not None
    except TdxvirtError:
        recorded = False
    return (f"{intent.name!r} was defined before its define was interrupted: kept"
            + ("" if recorded else f" (no TD record was written: if it is a TD, `tdxvirt adopt "
                                   f"{intent.name}` records it after you check it)"))


def _finish_undefine(intent: Intent) -> str:
    from ..domain.record import local_store
    from ..domain.storage_paths import remove_created

    removed = [path for path in intent.files if remove_created(path)]
    local_store().remove(intent.uuid)
    return (f"finished the interrupted undefine of {intent.name!r}: "
            + (f"deleted {', '.join(removed)}" if removed else "nothing left to delete"))


def _undo_define(intent: Intent) -> str:
    from ..domain.record import local_store
    from ..domain.storage_paths import remove_created

    removed = [path for path in intent.files if remove_created(path)]
    for folder in sorted({os.path.dirname(path) for path in intent.files}):
        removed += _remove_private_directories(folder, private_prefix(intent.uuid))
    local_store().remove(intent.uuid)
    return (f"undid the interrupted define of {intent.name!r} (libvirt does not have it): "
            + (f"deleted {', '.join(removed)}" if removed else "nothing was left"))


def _remove_private_directories(folder: str, prefix: str) -> list[str]:
    """The define's own private directories (0700, named after its UUID) in ``folder``,
    never followed through a symlink."""
    import shutil

    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    removed = []
    for entry in entries:
        if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed
