"""IOMMU groups and the rules for moving them to vfio-pci and back.

vfio hands a group to a VM only when every endpoint in it is bound to a vfio driver
(or to pci-stub, or to none); bridges and ports are exempt (the kernel's
vfio_dev_driver_allowed). So every endpoint of a GPU's group moves with the GPU,
and a group holding something the host itself uses (a NIC, a disk controller) is
refused rather than silently taken away from the host.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DeviceBusyError, HostNotReadyError
from ..host import HostRoot
from ..host.iommu import block_devices, group_members, is_bridge, net_interfaces
from ..host.nvidia import NVIDIA_VENDOR
from ..host.pci import PciDevice, read_device
from ..pci import PciAddress

VFIO_DRIVER = "vfio-pci"
# Drivers under which vfio still considers a group viable (see the module docstring).
VFIO_SAFE_DRIVERS = frozenset({VFIO_DRIVER, "pci-stub"})

_CLASS_NAMES = {
    0x01: "storage controller", 0x02: "network controller", 0x03: "display controller",
    0x04: "multimedia (audio) function", 0x05: "memory controller", 0x06: "bridge",
    0x07: "communication controller", 0x08: "system peripheral", 0x0C: "serial bus (USB)",
}


def describe_class(pci_class: int) -> str:
    return _CLASS_NAMES.get(pci_class >> 16, f"class {pci_class:#08x}")


@dataclass(frozen=True)
class Member:
    """One device of an IOMMU group, as far as moving the group is concerned."""

    device: PciDevice
    bridge: bool
    net: tuple[str, ...] = ()
    nvme: tuple[str, ...] = ()

    @property
    def address(self) -> PciAddress:
        return self.device.address

    @property
    def driver(self) -> str | None:
        return self.device.driver

    def describe(self) -> str:
        ids = f"{self.device.vendor:04x}:{self.device.device:04x}"
        return f"{self.address} ({describe_class(self.device.pci_class)} {ids})"

    def host_use(self) -> str | None:
        """Why the host is using this endpoint, or None when it may move to vfio.

        NVIDIA functions (the GPU's audio or USB function) move with their GPU; any
        other endpoint bound to a host driver is the host's (a NIC, a disk controller).
        """
        if self.bridge or self.driver is None or self.driver in VFIO_SAFE_DRIVERS:
            return None
        if self.device.vendor == NVIDIA_VENDOR:
            return None
        detail = f"driver {self.driver}"
        if self.net:
            detail += f", network interface {', '.join(self.net)}"
        if self.nvme:
            detail += f", NVMe {', '.join(self.nvme)}"
        return detail


@dataclass(frozen=True)
class IommuGroup:
    number: str
    members: tuple[Member, ...]

    @property
    def endpoints(self) -> tuple[Member, ...]:
        """The members that must move together (bridges excepted)."""
        return tuple(member for member in self.members if not member.bridge)

    def others(self, address: PciAddress) -> tuple[Member, ...]:
        return tuple(member for member in self.members if member.address != address)


def read_member(root: HostRoot, address: PciAddress) -> Member:
    device = read_device(root, address)
    return Member(
        device=device,
        bridge=is_bridge(root, address, device.pci_class),
        net=tuple(net_interfaces(root, address)),
        nvme=tuple(block_devices(root, address)),
    )


def read_group(root: HostRoot, device: PciDevice) -> IommuGroup:
    """The IOMMU group of ``device``; a device without one cannot go to vfio at all."""
    if device.iommu_group is None:
        raise HostNotReadyError(
            f"{device.address} has no IOMMU group, so vfio cannot take it: turn the "
            "IOMMU on (kernel arguments intel_iommu=on iommu=pt) and reboot"
        )
    addresses = group_members(root, device.iommu_group) or [device.address]
    return IommuGroup(device.iommu_group, tuple(read_member(root, a) for a in addresses))


def require_movable(group: IommuGroup, for_device: PciAddress,
                    exempt: frozenset[str] = frozenset()) -> None:
    """Refuse a group with an endpoint the host is using, naming it.

    ``exempt``: addresses known not to be the host's (they were on vfio-pci a moment ago).
    """
    for member in group.endpoints:
        use = None if str(member.address) in exempt else member.host_use()
        if use is not None:
            raise DeviceBusyError(
                f"IOMMU group {group.number} of {for_device} also holds {member.describe()}, "
                f"which the host is using ({use}); vfio needs the whole group, so moving "
                f"{for_device} would take it from the host: move the GPU to a slot with a "
                "group of its own, or unbind that device yourself first"
            )
