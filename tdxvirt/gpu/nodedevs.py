"""PCI facts from libvirt's node devices: the parser lives with the rest of libvirt's
facts (tdxvirt.facts.libvirt) and returns the one device record, PciDevice."""

from __future__ import annotations

from ..facts.libvirt import CAP_PCI_DEV, nodedev_name, parse_nodedev_xml, pci_node_devices

__all__ = ["CAP_PCI_DEV", "nodedev_name", "parse_nodedev_xml", "pci_node_devices"]
