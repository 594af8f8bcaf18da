"""PCI device facts: the one device record, and reading it from sysfs
(``/sys/bus/pci/devices/<bdf>``); tdxvirt.facts.libvirt reads the same record from
libvirt's node devices."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError, NotFoundError
from ..pci import PciAddress
from .root import HostRoot

PCI_DEVICES = "/sys/bus/pci/devices"

# Low bits of a sysfs ``resource`` line's flags (IORESOURCE_MEM); an I/O BAR never
# needs guest MMIO space.
_IORESOURCE_MEM = 0x200


@dataclass(frozen=True)
class PciDevice:
    """One PCI device of the host that runs the TD, wherever its facts came from:
    sysfs (tdxvirt.facts.local) or libvirt's node devices (tdxvirt.facts.libvirt).

    ``None`` means unknown, never "none": ``bar_sizes`` is None when the source does
    not report BARs (libvirt) and tdxvirt's table of known GPUs lacks the device."""

    address: PciAddress
    vendor: int
    device: int
    pci_class: int
    numa_node: int | None
    driver: str | None
    iommu_group: str | None
    bar_sizes: tuple[int, ...] | None
    product: str | None = None  # libvirt's (pci.ids) product name, e.g. "GH100 [H100 SXM5 80GB]"
    group_addresses: tuple[PciAddress, ...] = ()  # the IOMMU group's members, as libvirt lists them

    @property
    def mmio_bytes(self) -> int | None:
        """The memory BARs' total size; None when they are unknown."""
        return None if self.bar_sizes is None else sum(self.bar_sizes)


def _int(value: str | None, default: int | None = None) -> int | None:
    if value is None:
        return default
    try:
        return int(value, 0)
    except ValueError:
        return default


def parse_resource(text: str) -> tuple[int, ...]:
    """Sizes of the memory BARs in a sysfs ``resource`` file (start end flags)."""
    sizes = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 3:
            continue
        start, end, flags = (int(f, 16) for f in fields)
        if start and flags & _IORESOURCE_MEM:
            sizes.append(end - start + 1)
    return tuple(sizes)


def read_device(root: HostRoot, address: PciAddress) -> PciDevice:
    base = f"{PCI_DEVICES}/{address}"
    if not root.exists(base):
        raise NotFoundError(
            f"no PCI device {address} on this host; `lspci -D -d 10de:` lists the "
            "NVIDIA devices it has"
        )
    numa = _int(root.read_value(f"{base}/numa_node"), -1)
    return PciDevice(
        address=address,
        vendor=_int(root.read_value(f"{base}/vendor"), 0),
        device=_int(root.read_value(f"{base}/device"), 0),
        pci_class=_int(root.read_value(f"{base}/class"), 0),
        numa_node=None if numa is None or numa < 0 else numa,
        driver=root.link_name(f"{base}/driver"),
        iommu_group=root.link_name(f"{base}/iommu_group"),
        bar_sizes=parse_resource(root.read_value(f"{base}/resource") or ""),
    )


def vendor_devices(root: HostRoot, vendor: int) -> list[PciDevice]:
    """Every PCI device of this vendor under the host root, in address order (only
    their vendor file is read for the others)."""
    devices = []
    for entry in root.listdir(PCI_DEVICES):
        if root.read_value(f"{PCI_DEVICES}/{entry}/vendor") != f"{vendor:#06x}":
            continue
        try:
            devices.append(read_device(root, PciAddress.parse(entry)))
        except InputError:
            continue  # not a PCI address: nothing of ours
    return sorted(devices, key=lambda device: device.address)
