"""Who is using a GPU: host processes through the nvidia driver, or a VM through vfio."""

from __future__ import annotations

import re

from ..host import HostRoot
from ..host.devfiles import Holder, holders, nvidia_minor, vfio_device_files
from ..host.pci import PciDevice
from .devices import NVSWITCH, kind_of

_ANY_NVIDIA_GPU_FILE = re.compile(r"/dev/nvidia\d+")
_ANY_NVSWITCH_FILE = re.compile(r"/dev/nvidia-nvswitch\d+")


def host_users(root: HostRoot, device: PciDevice) -> list[Holder]:
    """Processes using the device through the nvidia driver (CUDA programs,
    nvidia-persistenced, nvidia-fabricmanager); none unless nvidia drives it.

    The driver names each GPU's file in /proc/driver/nvidia/gpus/<bdf>/information;
    when that is missing every /dev/nvidiaN counts, erring on the side of refusing.
    """
    if device.driver not in ("nvidia", "nvidia-nvswitch"):
        return []
    if kind_of(device) == NVSWITCH:
        return holders(root, lambda path: _ANY_NVSWITCH_FILE.fullmatch(path) is not None)
    minor = nvidia_minor(root, device.address)
    if minor is not None:
        own = f"/dev/nvidia{minor}"
        return holders(root, lambda path: path == own)
    return holders(root, lambda path: _ANY_NVIDIA_GPU_FILE.fullmatch(path) is not None)


def vm_users(root: HostRoot, device: PciDevice) -> list[Holder]:
    """Processes (QEMU of a running TD) holding the device's vfio group or cdev."""
    if device.driver != "vfio-pci":
        return []
    files = vfio_device_files(root, device.address, device.iommu_group)
    return holders(root, lambda path: path in files)
