"""Running processes by name, with their start time, from ``/proc``; and the loaded modules.

Used to tell which libvirt daemon serves the host (libvirtd or the modular
virtqemud) and whether it started before or after qemu.conf last changed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .root import HostRoot


@dataclass(frozen=True)
class Process:
    pid: int
    name: str
    started_at: float | None  # seconds since the epoch, None when not readable


def _boot_time(root: HostRoot) -> float | None:
    try:
        for line in root.read_text("/proc/stat").splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _start_ticks(stat: str) -> int | None:
    # Field 2 (comm) may hold spaces and parentheses: split after the last ')'.
    try:
        fields = stat[stat.rindex(")") + 2:].split()
        return int(fields[19])  # field 22 of the whole line: starttime
    except (ValueError, IndexError):
        return None


def _belongs(root: HostRoot, pid: str) -> bool:
    """A whole host in a root of this machine (HostRoot.process_root) runs the
    processes whose root directory is that root; every process of a plain tree does."""
    if root.process_root is None:
        return True
    try:
        return os.readlink(f"/proc/{pid}/root") == root.process_root
    except OSError:
        return False  # gone, or not ours to look at


def loaded_modules(root: HostRoot) -> frozenset[str] | None:
    """The kernel modules loaded now (``/proc/modules``), None when it is not readable."""
    text = root.read_value("/proc/modules")
    if text is None:
        return None
    return frozenset(line.split()[0] for line in text.splitlines() if line.strip())


def find_processes(root: HostRoot, names: tuple[str, ...]) -> list[Process]:
    # a host living in a root of this machine: its processes are in this machine's /proc
    procs = HostRoot("/") if root.process_root is not None else root
    boot = _boot_time(procs)
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    found = []
    for entry in procs.listdir("/proc"):
        if not entry.isdigit():
            continue
        name = procs.read_value(f"/proc/{entry}/comm")
        if name not in names or not _belongs(root, entry):
            continue
        started = None
        try:
            ticks = _start_ticks(procs.read_text(f"/proc/{entry}/stat"))
        except OSError:
            ticks = None
        if boot is not None and ticks is not None:
            started = boot + ticks / ticks_per_second
        found.append(Process(int(entry), name, started))
    return sorted(found, key=lambda p: p.pid)
