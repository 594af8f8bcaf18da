"""The kernel log, read the way dmesg reads it: records from ``/dev/kmsg``.

``/dev/kmsg`` blocks at its end, so it is opened non-blocking and read record by
record until EAGAIN. In a fake host root it is a plain file of records
(``PRIO,SEQ,USEC,FLAGS;MESSAGE`` per line), which reads the same way.
"""

from __future__ import annotations

import errno
import os

from .root import HostRoot

KMSG = "/dev/kmsg"
# One record is at most about 8 KiB (PRINTK_MESSAGE_MAX + prefix); reads are per record.
_RECORD = 16384
_LIMIT = 20000  # records; the ring buffer holds far fewer


class KernelLogUnreadable(Exception):
    """The log exists but may not be read (dmesg_restrict, not root)."""


def _message(record: str) -> str:
    head, _, message = record.partition(";")
    return message.split("\n", 1)[0] if "," in head else record


def read_kernel_log(root: HostRoot) -> list[str] | None:
    """Kernel log messages (without prefixes), None when there is no log to read."""
    path = root.path(KMSG)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except PermissionError as error:
        raise KernelLogUnreadable(str(error)) from None
    messages: list[str] = []
    try:
        if not os.path.isfile(path):
            return _read_device(fd, messages)
        with os.fdopen(fd, "r", errors="replace", closefd=False) as text:
            return [_message(line.rstrip("\n")) for line in text if line.strip()]
    finally:
        os.close(fd)


def _read_device(fd: int, messages: list[str]) -> list[str]:
    while len(messages) < _LIMIT:
        try:
            record = os.read(fd, _RECORD)
        except OSError as error:
            if error.errno == errno.EAGAIN:
                break
            if error.errno == errno.EPIPE:  # overwritten while reading: skip ahead
                continue
            if error.errno in (errno.EPERM, errno.EACCES):
                raise KernelLogUnreadable(str(error)) from None
            raise
        if not record:
            break
        messages.append(_message(record.decode("utf-8", "replace")))
    return messages
