"""Which /dev files belong to a PCI device, and which processes hold them open.

Read only, through a HostRoot: ``/proc/<pid>/fd`` links, the nvidia driver's
``/proc/driver/nvidia/gpus/<bdf>/information`` and the device's ``vfio-dev`` entry.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable

from ..pci import PciAddress
from .pci import PCI_DEVICES
from .root import HostRoot

_MINOR = re.compile(r"^Device Minor:\s*(\d+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Holder:
    """A process with a device file open."""

    pid: int
    command: str
    path: str

    def __str__(self) -> str:
        return f"{self.command} (pid {self.pid}) has {self.path} open"


def _entries(root: HostRoot, absolute: str) -> list[str]:
    # Processes come and go while we look, and another user's fds are not ours to
    # see (without root the scan is partial: host changes need root anyway).
    try:
        return os.listdir(root.path(absolute))
    except OSError:
        return []


def holders(root: HostRoot, wanted: Callable[[str], bool]) -> list[Holder]:
    """Processes with an open file whose path ``wanted`` accepts, one per (pid, path)."""
    found = set()
    for entry in _entries(root, "/proc"):
        if not entry.isdigit():
            continue
        fd_dir = f"/proc/{entry}/fd"
        for fd in _entries(root, fd_dir):
            try:
                target = os.readlink(root.path(f"{fd_dir}/{fd}"))
            except OSError:
                continue  # the process exited, or closed the fd, while we looked
            if wanted(target):
                try:
                    command = root.read_text(f"/proc/{entry}/comm").strip()
                except OSError:
                    command = "?"
                found.add(Holder(int(entry), command, target))
    return sorted(found, key=lambda holder: (holder.pid, holder.path))


def nvidia_minor(root: HostRoot, address: PciAddress) -> int | None:
    """The N of /dev/nvidiaN for a GPU the nvidia driver has, else None."""
    text = root.read_value(f"/proc/driver/nvidia/gpus/{address}/information")
    match = _MINOR.search(text or "")
    return int(match.group(1)) if match else None


def vfio_device_files(root: HostRoot, address: PciAddress, group: str | None) -> set[str]:
    """The VFIO files a VM opens for this device: its group and (iommufd) its cdev."""
    files = {f"/dev/vfio/{group}"} if group is not None else set()
    for cdev in root.listdir(f"{PCI_DEVICES}/{address}/vfio-dev"):
        files.add(f"/dev/vfio/devices/{cdev}")
    return files
