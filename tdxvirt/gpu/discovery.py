"""Every NVIDIA GPU and NVSwitch on the host, with what passing it through depends on.

Facts come from libvirt's node devices where libvirt has the device (its product
name, driver, IOMMU group, NUMA node), from sysfs through the HostRoot for the rest;
which defined domain holds each device comes from the domains' XML.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..errors import NotFoundError
from ..host import HostRoot
from ..host.iommu import group_members
from ..host.pci import PciDevice
from .devices import kind_of, model, nvidia_devices
from .groups import Member, describe_class, read_member
from .nodedevs import NodeDeviceFacts


@dataclass(frozen=True)
class Peer:
    """Another device in the same IOMMU group."""

    address: str
    description: str
    driver: str | None
    bridge: bool


@dataclass(frozen=True)
class GpuRecord:
    address: str
    kind: str
    vendor_id: str
    device_id: str
    model: str
    product: str | None  # libvirt's product name, when libvirt has the device
    driver: str | None
    iommu_group: str | None
    peers: tuple[Peer, ...]
    numa_node: int | None
    bar_sizes: tuple[int, ...]
    td: str | None = None  # the defined domain whose XML passes it through
    cc_mode: str | None = None
    ppcie_mode: str | None = None

    @property
    def largest_bar(self) -> int:
        return max(self.bar_sizes, default=0)

    def to_json(self) -> dict:
        record = asdict(self)
        record["peers"] = [asdict(peer) for peer in self.peers]
        record["bar_sizes"] = list(self.bar_sizes)
        record["largest_bar"] = self.largest_bar
        return record


def _peer(member: Member) -> Peer:
    device = member.device
    description = (model(device) if kind_of(device) else
                   f"{describe_class(device.pci_class)} {device.vendor:04x}:{device.device:04x}")
    return Peer(str(member.address), description, member.driver, member.bridge)


def _peers(root: HostRoot, device: PciDevice, libvirt: NodeDeviceFacts | None) -> tuple[Peer, ...]:
    addresses = (group_members(root, device.iommu_group) if device.iommu_group is not None
                 else [])
    if not addresses and libvirt is not None:
        addresses = list(libvirt.group_addresses)
    peers = []
    for address in addresses:
        if address == device.address:
            continue
        try:
            peers.append(_peer(read_member(root, address)))
        except NotFoundError:
            peers.append(Peer(str(address), "not in sysfs", None, False))
    return tuple(peers)


def record(root: HostRoot, device: PciDevice, libvirt: NodeDeviceFacts | None = None,
           td: str | None = None) -> GpuRecord:
    known = libvirt  # libvirt's facts win where it has them
    return GpuRecord(
        address=str(device.address),
        kind=kind_of(device) or "?",
        vendor_id=f"{device.vendor:#06x}",
        device_id=f"{device.device:#06x}",
        model=model(device),
        product=known.product if known else None,
        driver=(known.driver if known and known.driver else device.driver),
        iommu_group=(known.iommu_group if known and known.iommu_group else device.iommu_group),
        peers=_peers(root, device, known),
        numa_node=(known.numa_node if known and known.numa_node is not None else device.numa_node),
        bar_sizes=device.bar_sizes,
        td=td,
    )


def discover(root: HostRoot, conn=None) -> list[GpuRecord]:
    """Every NVIDIA GPU / NVSwitch; ``conn`` (optional) adds libvirt's facts and holders."""
    nodedevs: dict[str, NodeDeviceFacts] = {}
    holders: dict[str, str] = {}
    if conn is not None:
        from ..tds import gpu_holders
        from .nodedevs import pci_node_devices

        nodedevs = pci_node_devices(conn)
        holders = gpu_holders(conn)
    return [record(root, device, nodedevs.get(str(device.address)),
                   holders.get(str(device.address)))
            for device in nvidia_devices(root)]


def with_modes(records: list[GpuRecord], modes: dict[str, tuple[str | None, str | None]]) -> list[GpuRecord]:
    """Records with the CC / PPCIe modes read by ``ccmode.query``."""
    return [replace(r, cc_mode=modes.get(r.address, (None, None))[0],
                    ppcie_mode=modes.get(r.address, (None, None))[1]) for r in records]
