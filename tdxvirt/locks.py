"""Locks, so two tdxvirt processes never give one GPU (or name) twice.

flock(2) locks on files under ``<state>/locks``: the kernel drops them when their
process dies, so a killed tdxvirt never leaves a lock behind that blocks anyone.
They serialise tdxvirt processes on this machine only; libvirt itself is the
arbiter for other tools.

A key names the host that runs the TD (tdxvirt.virt.conn.host_of: the URI's hostname, or
``localhost``) and the device or domain name: GPU 0000:38:00.0 of host A and of
host B are different GPUs, and two TDs named alike on two hosts do not collide.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import DeviceBusyError, TdxvirtError
from .paths import state_dir


def _lock_path(key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)
    return state_dir() / "locks" / f"{safe}.lock"


def _open_lock(path: Path) -> int:
    """The lock file, never through a symlink (O_NOFOLLOW): a link planted at its name
    would have root create or open another file (issue #18)."""
    try:
        handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
                         | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0), 0o600)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise TdxvirtError(f"lock file {path} is a symlink; tdxvirt never follows one "
                               "there: remove it and try again") from None
        raise TdxvirtError(f"cannot open the lock file {path}: {error.strerror}") from None
    if not stat.S_ISREG(os.fstat(handle).st_mode):
        os.close(handle)
        raise TdxvirtError(f"lock file {path} is not a regular file; remove it and try again")
    return handle


@contextmanager
def held(keys, timeout: float = 30.0, poll: float = 0.05):
    """Hold every key's lock (taken in sorted order, so two holders cannot deadlock)."""
    handles = []
    try:
        for key in sorted(set(keys)):
            path = _lock_path(key)
            try:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as error:  # a full or read-only state directory: one line
                raise TdxvirtError(f"cannot create the lock directory {path.parent} "
                                   f"({error.strerror}); nothing was changed") from None
            handle = _open_lock(path)
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


def gpu_keys(host: str, addresses) -> list[str]:
    """The keys of PCI devices of ``host`` (tdxvirt.virt.conn.host_of of the URI)."""
    return [f"pci-{address}@{host}" for address in addresses]


def name_key(host: str, name: str) -> str:
    """The key of a domain name on ``host``."""
    return f"domain-{name}@{host}"
