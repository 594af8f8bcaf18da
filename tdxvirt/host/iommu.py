"""IOMMU groups and PCI bridge-ness, read from sysfs through a HostRoot (read only)."""

from __future__ import annotations

from ..errors import InputError
from ..pci import PciAddress
from .pci import PCI_DEVICES
from .root import HostRoot

IOMMU_GROUPS = "/sys/kernel/iommu_groups"

# Config-space byte 0x0e is the header type; bit 7 only says "multi-function".
_HEADER_TYPE_OFFSET = 0x0E
_HEADER_NORMAL = 0x00
# Class codes (base class + subclass) whose header is a bridge's (type 1 or 2), for
# when config space cannot be read: PCI-to-PCI, CardBus, semi-transparent PCI-to-PCI.
_BRIDGE_CLASSES = {0x0604, 0x0607, 0x0609}


def group_members(root: HostRoot, group: str) -> list[PciAddress]:
    """Every PCI device in IOMMU group ``group``, in address order."""
    members = []
    for name in root.listdir(f"{IOMMU_GROUPS}/{group}/devices"):
        try:
            members.append(PciAddress.parse(name))
        except InputError:
            continue  # a non-PCI device in the group (platform device): not ours to move
    return sorted(members)


def is_bridge(root: HostRoot, address: PciAddress, pci_class: int) -> bool:
    """A bridge or port, which vfio accepts in a group whatever driver it has.

    The kernel's rule (vfio_dev_driver_allowed) is "header type is not normal"; the
    header type is read from config space when it can be, else guessed from the class.
    """
    try:
        with open(root.path(f"{PCI_DEVICES}/{address}/config"), "rb") as config:
            config.seek(_HEADER_TYPE_OFFSET)
            header = config.read(1)
    except OSError:
        header = b""
    if header:
        return (header[0] & 0x7F) != _HEADER_NORMAL
    return (pci_class >> 8) in _BRIDGE_CLASSES


def net_interfaces(root: HostRoot, address: PciAddress) -> list[str]:
    """Network interfaces the host has on this device (``ip link`` names)."""
    return root.listdir(f"{PCI_DEVICES}/{address}/net")


def block_devices(root: HostRoot, address: PciAddress) -> list[str]:
    """NVMe controllers the host has on this device (a storage controller in use)."""
    return root.listdir(f"{PCI_DEVICES}/{address}/nvme")
