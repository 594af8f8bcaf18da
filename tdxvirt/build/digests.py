"""SHA-256 and size of a build artifact, read bounded and only from a regular file.

The artifacts record keeps each file's digest so a file later replaced at the same
path (another OVMF.fd, a rebuilt QEMU) is told apart from the one that was built.
Reading refuses what is not a regular file (a FIFO would block, /dev/zero never
ends) and stops at ``MAX_BYTES``: no artifact of a kernel, QEMU or OVMF build comes
near it, so anything larger is not what the build made.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

MAX_BYTES = 2 << 30  # 2 GiB; a debug qemu-system-x86_64 is a few hundred MB
_BLOCK = 1 << 20


class DigestError(Exception):
    """The file cannot be digested; the message says why (one line)."""


@dataclass(frozen=True)
class Digest:
    sha256: str
    size: int

    def to_json(self) -> dict:
        return {"sha256": self.sha256, "size": self.size}


def digest(path: str | Path, limit: int = MAX_BYTES, sink=None) -> Digest:
    """The SHA-256 and size of the regular file at ``path`` (symbolic links followed).

    ``sink`` (a binary file) gets every block read: a copy whose digest is known from
    the one reading, so the file copied is the file digested (``build install``)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DigestError(f"{path} is missing") from None
    except OSError as error:
        raise DigestError(f"{path} cannot be opened ({error.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise DigestError(f"{path} is not a regular file ({_kind(info.st_mode)})")
    with os.fdopen(fd, "rb", buffering=0) as file:
        if info.st_size > limit:
            raise DigestError(f"{path} is {info.st_size} bytes, more than the {limit} an artifact may be")
        hasher = hashlib.sha256()
        remaining = info.st_size
        while remaining > 0:  # at most the size fstat gave: a file growing meanwhile is not followed
            block = file.read(min(_BLOCK, remaining))
            if not block:
                raise DigestError(f"{path} shrank while it was read")
            hasher.update(block)
            if sink is not None:
                sink.write(block)
            remaining -= len(block)
    return Digest(sha256=hasher.hexdigest(), size=info.st_size)


@dataclass(frozen=True)
class Check:
    """How an artifact's file compares with what was recorded."""

    state: str  # "ok", "changed", "missing", "unreadable", "unrecorded" (an older record)
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "ok"


def check(path: str, recorded: dict | None) -> Check:
    """Compare the file at ``path`` with its recorded ``{"sha256", "size"}``."""
    if os.path.isdir(path):  # the kernel's modules folder: existence is all that is kept
        return Check("ok", "a folder")
    if not os.path.lexists(path):
        return Check("missing", f"{path} no longer exists")
    try:
        now = digest(path)
    except DigestError as error:
        return Check("unreadable", str(error))
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), str):
        return Check("unrecorded", f"no digest was recorded for {path} (built by an older tdxvirt)")
    if now.sha256 != recorded["sha256"] or now.size != recorded.get("size"):
        return Check("changed", f"{path} changed since it was recorded: sha256 {recorded['sha256'][:16]} "
                                f"({recorded.get('size')} bytes) then, {now.sha256[:16]} ({now.size} bytes) now")
    return Check("ok", "")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"
