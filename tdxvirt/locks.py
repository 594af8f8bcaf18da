"""Host-local locks, so two tdxvirt processes never give one GPU (or name) twice.

flock(2) locks on files under ``<state>/locks``: the kernel drops them when their
process dies, so a killed tdxvirt never leaves a lock behind that blocks anyone.
They serialise tdxvirt processes on this machine only; libvirt itself is the
arbiter for other tools.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import DeviceBusyError
from .paths import state_dir


def _lock_path(key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)
    return state_dir() / "locks" / f"{safe}.lock"


@contextmanager
def held(keys, timeout: float = 30.0, poll: float = 0.05):
    """Hold every key's lock (taken in sorted order, so two holders cannot deadlock)."""
    handles = []
    try:
        for key in sorted(set(keys)):
            path = _lock_path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            handles.append(handle)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as error:
                    if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                    if time.monotonic() >= deadline:
                        raise DeviceBusyError(
                            f"another tdxvirt has held {key} for {timeout:.0f} s; "
                            "wait for it to finish and try again") from None
                    time.sleep(poll)
        yield
    finally:
        for handle in handles:
            os.close(handle)  # closing releases the flock


def gpu_keys(addresses) -> list[str]:
    return [f"pci-{address}" for address in addresses]


def name_key(name: str) -> str:
    return f"domain-{name}"
