"""PCI facts from libvirt's node devices (``virsh nodedev-dumpxml pci_...``)."""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from ..pci import PciAddress

# virConnectListAllNodeDeviceFlags VIR_CONNECT_LIST_NODE_DEVICES_CAP_PCI_DEV
CAP_PCI_DEV = 2


@dataclass(frozen=True)
class NodeDeviceFacts:
    name: str
    address: PciAddress
    driver: str | None
    product: str | None  # libvirt's (pci.ids) product name, e.g. "GH100 [H100 SXM5 80GB]"
    iommu_group: str | None
    group_addresses: tuple[PciAddress, ...]
    numa_node: int | None


def _hex(value: str | None) -> int:
    return int(value or "0", 0)


def parse_nodedev_xml(xml: str) -> NodeDeviceFacts | None:
    """The facts of a PCI node device's XML; None for any other kind of device."""
    root = etree.fromstring(xml.encode())
    cap = root.find("capability[@type='pci']")
    if cap is None:
        return None
    address = PciAddress(*(int(cap.findtext(tag) or "0", 0)
                           for tag in ("domain", "bus", "slot", "function")))
    group = cap.find("iommuGroup")
    numa = cap.find("numa")
    numa_node = int(numa.get("node")) if numa is not None and numa.get("node") else None
    return NodeDeviceFacts(
        name=root.findtext("name") or "",
        address=address,
        driver=root.findtext("driver/name") or None,
        product=(cap.findtext("product") or "").strip() or None,
        iommu_group=group.get("number") if group is not None else None,
        group_addresses=tuple(
            PciAddress(*(_hex(a.get(k)) for k in ("domain", "bus", "slot", "function")))
            for a in (group.iterfind("address") if group is not None else ())
        ),
        numa_node=None if numa_node is None or numa_node < 0 else numa_node,
    )


def pci_node_devices(conn) -> dict[str, NodeDeviceFacts]:
    """Every PCI node device libvirt knows, by full address (0000:38:00.0)."""
    facts = {}
    for device in conn.listAllDevices(CAP_PCI_DEV):
        parsed = parse_nodedev_xml(device.XMLDesc(0))
        if parsed is not None:
            facts[str(parsed.address)] = parsed
    return facts
