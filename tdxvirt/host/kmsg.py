"""The kernel log, read the way dmesg reads it: records from ``/dev/kmsg``.

``/dev/kmsg`` blocks at its end, so it is opened non-blocking and read record by
record until EAGAIN. In a fake host root it is a plain file of records
(``PRIO,SEQ,USEC,FLAGS;MESSAGE`` per line), which reads the same way.
"""

from __future__ import annotations

import errno
import os
import re

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


# How kernels name the TDX module's version as they initialise it: Linux 6.8-6.15
# ("TDX module: attributes 0x0, vendor_id 0x8086, major_version 1, minor_version 5,
# build_date 20240129, build_num 698") and later ones ("... version 1.5.06 ...").
_TDX_FIELDS = re.compile(r"major_version (?P<major>\d+), minor_version (?P<minor>\d+)"
                         r"(?:, build_date (?P<date>\d+))?(?:, build_num (?P<build>\d+))?")
_TDX_DOTTED = re.compile(r"\bversion:? (?P<dotted>\d+\.\d+(?:\.\d+)*)")


def tdx_module_version(messages: list[str]) -> str | None:
    """The TDX module's version as the kernel logged it ("1.5 build 698 (20240129)"),
    None when no message names it. Only lines of the kernel's TDX code are read."""
    for message in reversed(messages):
        if not (message.startswith("virt/tdx:") or "TDX module" in message):
            continue
        if fields := _TDX_FIELDS.search(message):
            version = f"{fields['major']}.{fields['minor']}"
            if fields["build"]:
                version += f" build {fields['build']}"
            return version + (f" ({fields['date']})" if fields["date"] else "")
        if dotted := _TDX_DOTTED.search(message):
            return dotted["dotted"]
    return None
