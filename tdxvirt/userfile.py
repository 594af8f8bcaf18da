"""Reading a file the user named on the command line, with one clear error if not.

tdxvirt often runs as root, so such a file may be one only root can read (a shadow
file, a key): its content never appears in an error, here or in the callers' messages
(issue #18). Only a regular file is read: the file is opened with O_NONBLOCK (a FIFO
cannot make the open hang) and checked with fstat on the opened descriptor before a
single byte is read (a FIFO, a device such as /dev/zero or a socket is refused), and
at most ``limit`` bytes are read (a file that grew past it is refused).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import InputError, NotFoundError

DEFAULT_LIMIT = 64 * 1024 * 1024

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISDIR, "a directory"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _size(count: int) -> str:
    for unit, scale in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if count >= scale and count % scale == 0:
            return f"{count // scale} {unit}"
    return f"{count} bytes"


def read_user_file(path: str | Path, what: str, hint: str = "", limit: int = DEFAULT_LIMIT) -> bytes:
    """The file's bytes, or an error naming ``what`` it was meant to be and ``hint``
    (never quoting the file's content)."""
    path = Path(path)
    fix = f"; {hint}" if hint else ""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise NotFoundError(f"{what} {path} does not exist{fix}") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a directory{fix}") from None
    except OSError as error:
        raise InputError(f"cannot read {what} {path}: {error.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InputError(f"{what} {path} is {_kind(mode)}, not a regular file{fix}")
        chunks, total = [], 0
        while True:
            try:
                chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            except OSError as error:
                raise InputError(f"cannot read {what} {path}: {error.strerror}") from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise InputError(f"{what} {path} is larger than {_size(limit)}, the most "
                                 f"tdxvirt reads{fix}")
        return b"".join(chunks)
    finally:
        os.close(fd)
