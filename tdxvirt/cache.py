"""Derived values kept between runs in the state directory, keyed by what they derive from.

A command is a new process each time, so work that depends only on a file's bytes
(a firmware's MRTD: about 30 ms of SHA-384) or on tdxvirt's own templates (Jinja's
compiled code: about 35 ms) was redone at every define. Each value lives in
``<state dir>/cache/<kind>/<key>``: root's state directory for root (0700, not
writable by anyone else, so a value read back is as trusted as the code that wrote
it), the user's own otherwise. Writes are atomic and best-effort: a full or read-only
disk only costs the time saved. Reads are bounded and never follow a symlink.
"""

from __future__ import annotations

import os
from pathlib import Path

_READ_LIMIT = 1 << 20


def directory(kind: str) -> Path:
    from .paths import state_dir

    return state_dir() / "cache" / kind


def read(kind: str, key: str) -> bytes | None:
    """The value stored under ``key``, or None (missing, unreadable, not a regular file)."""
    try:
        fd = os.open(directory(kind) / key, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not _regular(fd):
            return None
        return os.read(fd, _READ_LIMIT)
    except OSError:
        return None
    finally:
        os.close(fd)


def write(kind: str, key: str, value: bytes) -> None:
    """Store ``value`` under ``key`` (0600, atomically); failures are ignored."""
    folder = directory(kind)
    temporary = folder / f".{key}.{os.getpid()}"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(value)
        os.replace(temporary, folder / key)
    except OSError:
        try:
            os.unlink(temporary)  # this run's own half-written file
        except OSError:
            pass


def _regular(fd: int) -> bool:
    import stat

    return stat.S_ISREG(os.fstat(fd).st_mode)
