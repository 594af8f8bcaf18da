"""Every NVIDIA GPU and NVSwitch on the host that runs the TDs, with what passing it
through depends on.

The facts come from tdxvirt.facts: this machine's sysfs (with libvirt's product names
and, where libvirt has the device, its driver, IOMMU group and NUMA node) for a local
URI; for a remote one, that host's libvirt node devices alone, with BAR sizes from
tdxvirt's table of known GPUs (unknown otherwise). Which defined domain holds each
device comes from the domains' XML.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..errors import NotFoundError
from ..facts import HostFacts
from ..host import HostRoot
from ..host.pci import PciDevice
from .devices import kind_of, model
from .groups import describe_class


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
    bar_sizes: tuple[int, ...] | None  # None: unknown (a remote host's unlisted device)
    td: str | None = None  # the defined domain whose XML passes it through
    cc_mode: str | None = None
    ppcie_mode: str | None = None

    @property
    def largest_bar(self) -> int | None:
        return None if self.bar_sizes is None else max(self.bar_sizes, default=0)

    def to_json(self) -> dict:
        record = asdict(self)
        record["peers"] = [asdict(peer) for peer in self.peers]
        record["bar_sizes"] = None if self.bar_sizes is None else list(self.bar_sizes)
        record["largest_bar"] = self.largest_bar
        return record


def _peer(facts: HostFacts, address) -> Peer:
    try:
        device = facts.device(address)
    except NotFoundError:
        return Peer(str(address), f"not on {facts.where}" if facts.remote else "not in sysfs",
                    None, False)
    description = (model(device) if kind_of(device) else
                   f"{describe_class(device.pci_class)} {device.vendor:04x}:{device.device:04x}")
    return Peer(str(address), description, device.driver, facts.is_bridge(device))


def _peers(facts: HostFacts, device: PciDevice, libvirt: PciDevice | None) -> tuple[Peer, ...]:
    addresses = facts.group_members(device)
    if not addresses and libvirt is not None:
        addresses = list(libvirt.group_addresses)
    return tuple(_peer(facts, address) for address in addresses if address != device.address)


def record(facts: HostFacts, device: PciDevice, libvirt: PciDevice | None = None,
           td: str | None = None) -> GpuRecord:
    """``libvirt``: libvirt's record of a local device, whose facts win where it has them."""
    known = libvirt
    return GpuRecord(
        address=str(device.address),
        kind=kind_of(device) or "?",
        vendor_id=f"{device.vendor:#06x}",
        device_id=f"{device.device:#06x}",
        model=model(device),
        product=known.product if known else device.product,
        driver=(known.driver if known and known.driver else device.driver),
        iommu_group=(known.iommu_group if known and known.iommu_group else device.iommu_group),
        peers=_peers(facts, device, known),
        numa_node=(known.numa_node if known and known.numa_node is not None else device.numa_node),
        bar_sizes=device.bar_sizes,
        td=td,
    )


def discover(facts: HostFacts | HostRoot, conn=None) -> list[GpuRecord]:
    """Every NVIDIA GPU / NVSwitch of the host; ``conn`` (optional) adds the holders (and,
    for this machine, libvirt's facts). A HostRoot stands for this machine's facts."""
    if not isinstance(facts, HostFacts):
        from ..facts.local import LocalFacts

        facts = LocalFacts(facts, conn.getURI() if conn is not None else "", conn)
    holders: dict[str, str] = {}
    if conn is not None:  # every domain that passes the device through, not just one
        from ..lifecycle.assemble import all_gpu_holders

        holders = {address: ",".join(names) for address, names in all_gpu_holders(conn).items()}
    nodedevs = facts.libvirt_devices()
    return [record(facts, device, nodedevs.get(str(device.address)),
                   holders.get(str(device.address)))
            for device in facts.nvidia_devices()]


def with_modes(records: list[GpuRecord], modes: dict[str, tuple[str | None, str | None]]) -> list[GpuRecord]:
    """Records with the CC / PPCIe modes read by ``ccmode.query``."""
    return [replace(r, cc_mode=modes.get(r.address, (None, None))[0],
                    ppcie_mode=modes.get(r.address, (None, None))[1]) for r in records]
