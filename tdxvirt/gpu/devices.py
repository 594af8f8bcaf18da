"""Which PCI devices are NVIDIA GPUs or NVSwitches, and reading the ones a user names."""

from __future__ import annotations

from typing import Iterable

from ..errors import InputError
from ..host import HostRoot
from ..host.nvidia import GPU_MODELS, NVIDIA_VENDOR, NVSWITCH_IDS, model_name
from ..host.pci import PCI_DEVICES, PciDevice, read_device
from ..pci import PciAddress

GPU = "GPU"
NVSWITCH = "NVSwitch"

_GPU_CLASSES = {0x0300, 0x0302}  # VGA, 3D controller (the H100 SXM5 says 0x0302)
# NVSwitches report "bridge, other" (0x068000); NVIDIA's own tool finds them by it,
# so an NVSwitch id tdxvirt does not know yet is still recognised.
_NVSWITCH_CLASS = 0x0680


def kind_of(device: PciDevice) -> str | None:
    """GPU, NVSwitch, or None for anything else (an audio function, another vendor)."""
    if device.vendor != NVIDIA_VENDOR:
        return None
    if device.device in NVSWITCH_IDS or (device.pci_class >> 8) == _NVSWITCH_CLASS:
        return NVSWITCH
    if (device.pci_class >> 8) in _GPU_CLASSES:
        return GPU
    return None


def model(device: PciDevice) -> str:
    """Model name from the device id; an unknown id is shown as hex, never dropped."""
    return model_name(device)


def is_hopper(device: PciDevice) -> bool:
    """A Hopper GPU (H100, H200, H800, H20): the GPUs of an HGX board with PPCIe."""
    return kind_of(device) == GPU and device.device in GPU_MODELS


def nvidia_devices(root: HostRoot) -> list[PciDevice]:
    """Every NVIDIA GPU and NVSwitch on the host, in address order."""
    found = []
    for name in root.listdir(PCI_DEVICES):
        try:
            address = PciAddress.parse(name)
        except InputError:
            continue
        device = read_device(root, address)
        if kind_of(device) is not None:
            found.append(device)
    return sorted(found, key=lambda device: device.address)


def read_targets(root: HostRoot, texts: Iterable[str]) -> list[PciDevice]:
    """The GPUs / NVSwitches a user named, parsed and checked; duplicates dropped.

    Raises InputError (bad address, not an NVIDIA GPU or NVSwitch) or NotFoundError
    (no such device) before anything is changed.
    """
    addresses: list[PciAddress] = []
    for text in texts:
        address = PciAddress.parse(text)
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise InputError("no device given: name one or more GPUs, e.g. 38:00.0 "
                         "(`tdxvirt gpu list` shows them)")
    devices = [read_device(root, address) for address in addresses]
    for device in devices:
        if kind_of(device) is None:
            raise InputError(
                f"{device.address} is not an NVIDIA GPU or NVSwitch (vendor "
                f"{device.vendor:#06x}, class {device.pci_class:#08x}); name the GPU "
                "itself (`tdxvirt gpu list` shows them): its IOMMU group moves with it"
            )
    return devices
