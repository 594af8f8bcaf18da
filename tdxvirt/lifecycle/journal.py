"""Intent records for changes that take more than one step, finished by whoever comes next.

``undefine --remove-storage`` is three steps: libvirt forgets the domain, tdxvirt deletes
the files it created for it, then its record. A tdxvirt (or libvirtd) killed between
them left the overlay and its records behind for ever: the domain was gone, a re-run
said "no domain", and a new define of the name found the overlay in its way. So before
the first step an intent is written as root under ``<state dir>/journal`` (0700, each
record 0600): the URI, the domain's UUID and name, and the files already checked for
deletion. The next ``define`` or ``undefine`` on this machine (or ``tdxvirt recover``)
looks at what libvirt actually holds, asked by the UUID:

- the domain is gone: the undefine happened, so its files are deleted (each only if it
  is still the very file tdxvirt created, reached without symlinks, as
  tdxvirt.domain.storage_paths checks) and its record forgotten;
- the domain is still there: the undefine never happened; the intent is dropped and
  everything stays;
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
    op: str  # "undefine"
    uri: str
    uuid: str
    name: str
    files: tuple[str, ...]  # checked for deletion (tdxvirt.domain.storage_paths)


def directory() -> Path:
    from ..paths import state_dir

    return state_dir() / "journal"


def begin(intent: Intent) -> Path:
    """Write the intent (atomically, fsynced) before the first step."""
    folder = directory()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / f"{intent.op}-{intent.uuid}.json"
    temporary = folder / f".{path.name}.{os.getpid()}.tmp"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({**asdict(intent), "files": list(intent.files)}, handle)
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
            intent = Intent(str(data["op"]), str(data["uri"]), str(data["uuid"]), str(data["name"]),
                            tuple(str(f) for f in data["files"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found.append((path, intent))
    return found


def recover() -> list[str]:
    """Finish or drop every pending intent by asking libvirt; what was done, one line each."""
    from ..virt.conn import libvirt_error_type, open_connection
    from ..virt.lookup import _absent

    done = []
    for path, intent in pending():
        if intent.op != "undefine":
            continue
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
                done.append(_finish_undefine(intent))
            else:
                done.append(f"{intent.name!r} is still defined: its interrupted undefine never "
                            "happened, nothing was deleted")
            end(path)
        finally:
            conn.close()
    return done


def _finish_undefine(intent: Intent) -> str:
    from ..domain.record import local_store
    from ..domain.storage_paths import remove_created

    removed = [path for path in intent.files if remove_created(path)]
    local_store().remove(intent.uuid)
    return (f"finished the interrupted undefine of {intent.name!r}: "
            + (f"deleted {', '.join(removed)}" if removed else "nothing left to delete"))
