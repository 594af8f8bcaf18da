"""tdxvirt's mark on the domains it defines, and reading it back.

The mark lives in the domain XML (``<metadata><tdxvirt:td xmlns:tdxvirt=...>``), so a
TD edited in virsh or virt-manager keeps it and is still recognised.
"""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

NAMESPACE = "urn:tdxvirt:td:1"
_NS = {"t": NAMESPACE}


@dataclass(frozen=True)
class DomainFacts:
    """What tdxvirt reads from a domain's XML."""

    name: str
    managed_by_tdxvirt: bool
    tdx: bool
    gpus: tuple[str, ...]
    vcpus: int
    memory_kib: int


def read_domain_xml(xml: str) -> DomainFacts:
    root = etree.fromstring(xml.encode())
    mark = root.find("metadata/t:td", _NS)
    hostdev_gpus = tuple(
        "{:04x}:{:02x}:{:02x}.{:x}".format(
            *(int(a.get(k), 16) for k in ("domain", "bus", "slot", "function"))
        )
        for a in root.iterfind("devices/hostdev[@type='pci']/source/address")
    )
    return DomainFacts(
        name=root.findtext("name"),
        managed_by_tdxvirt=mark is not None,
        tdx=root.find("launchSecurity[@type='tdx']") is not None,
        gpus=hostdev_gpus,
        vcpus=int(root.findtext("vcpu") or 0),
        memory_kib=_kib(root.find("memory")),
    )


_UNIT_KIB = {"b": 1 / 1024, "bytes": 1 / 1024, "k": 1, "kib": 1, "m": 1024, "mib": 1024,
             "g": 1024**2, "gib": 1024**2, "t": 1024**3, "tib": 1024**3}


def _kib(memory) -> int:
    if memory is None or not memory.text:
        return 0
    return int(int(memory.text) * _UNIT_KIB.get(memory.get("unit", "KiB").lower(), 1))
