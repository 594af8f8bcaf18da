"""SHA-256 and size of a file, read once, streamed, bounded and only from a regular file.

The one reader behind every digest tdxvirt keeps of a file: the build record's
artifacts (tdxvirt.build.digests) and the firmware, kernel and initrd of a TD record
(tdxvirt.domain.recordfiles). Reading refuses what is not a regular file (a FIFO
would block, /dev/zero never ends): the file is opened with O_NONBLOCK, so opening a
FIFO cannot wait for a writer, and fstat on the opened descriptor refuses it before a
byte is read. At most the size fstat gave is read, and only when it is within
``limit``. Symbolic links are followed, as QEMU and the build tools follow them: what
is digested is the content behind the path, and that is what is compared.

Standard library only: libvirt's hook loads it with the daemon root's Python.
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
    """The file cannot be digested: ``str()`` is one line, the path then ``reason``."""

    def __init__(self, path, reason: str, missing: bool = False):
        super().__init__(f"{path} {reason}")
        self.reason = reason  # "is missing", "is not a regular file (a FIFO)", ...
        self.missing = missing


@dataclass(frozen=True)
class Digest:
    sha256: str
    size: int

    def to_json(self) -> dict:
        return {"sha256": self.sha256, "size": self.size}


def digest(path: str | Path, limit: int = MAX_BYTES, what: str = "an artifact", sink=None) -> Digest:
    """The SHA-256 and size of the regular file at ``path`` (symbolic links followed);
    ``what`` names the file in the refusal of one larger than ``limit``. ``sink`` (a
    binary file) gets every block read: a copy whose digest is known from the one
    reading, so the file copied is the file digested (``build install``)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DigestError(path, "is missing", missing=True) from None
    except OSError as error:
        raise DigestError(path, f"cannot be opened ({error.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise DigestError(path, f"is not a regular file ({kind(info.st_mode)})")
    with os.fdopen(fd, "rb", buffering=0) as file:
        if info.st_size > limit:
            raise DigestError(path, f"is {info.st_size} bytes, more than the {limit} {what} may be")
        hasher = hashlib.sha256()
        remaining = info.st_size
        while remaining > 0:  # at most the size fstat gave: a file growing meanwhile is not followed
            block = file.read(min(_BLOCK, remaining))
            if not block:
                raise DigestError(path, "shrank while it was read")
            hasher.update(block)
            if sink is not None:
                sink.write(block)
            remaining -= len(block)
    return Digest(sha256=hasher.hexdigest(), size=info.st_size)


def kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"
