"""tdxvirt's mark on the domains it defines, and reading it back.

The mark lives in the domain XML (``<metadata><tdxvirt:td xmlns:tdxvirt=...>``), so a
TD edited in virsh or virt-manager keeps it and is still recognised.
"""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

NAMESPACE = "urn:tdxvirt:td:1"
# Live-only runtime facts (start time) live in a namespace of their own, so setting
# them never replaces the persistent tdxvirt:td element.
RUN_NAMESPACE = "urn:tdxvirt:run:1"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
_NS = {"t": NAMESPACE}


@dataclass(frozen=True)
class DomainFacts:
    """What tdxvirt reads from a domain's XML."""

    name: str
    managed_by_tdxvirt: bool
    tdx: bool
    gpus: tuple[str, ...]  # every PCI hostdev: GPUs and NVSwitches
    vcpus: int
    memory_kib: int
    dialect: str | None = None
    overlay: str | None = None  # the disk overlay tdxvirt created, if any
    seed: str | None = None  # the cloud-init seed ISO tdxvirt created, if any
    started: float | None = None  # when tdxvirt started it (live metadata), epoch seconds


# Compiled once: `list` reads a thousand domains, and compiling per call cost more
# than parsing the XML.
_QEMU_ARGS = etree.XPath("q:commandline/q:arg/@value", namespaces={"q": QEMU_NS})
_HOSTDEV_ADDRESSES = etree.XPath("devices/hostdev[@type='pci']/source/address")


def read_domain_xml(xml: str) -> DomainFacts:
    root = etree.fromstring(xml.encode())
    mark = root.find("metadata/t:td", _NS)
    run = root.find("metadata/r:run", {"r": RUN_NAMESPACE})
    hostdev_gpus = tuple(
        "{:04x}:{:02x}:{:02x}.{:x}".format(
            *(int(a.get(k), 16) for k in ("domain", "bus", "slot", "function"))
        )
        for a in _HOSTDEV_ADDRESSES(root)
    )
    return DomainFacts(
        name=root.findtext("name"),
        managed_by_tdxvirt=mark is not None,
        tdx=root.find("launchSecurity[@type='tdx']") is not None
        or any("tdx-guest" in v for v in _QEMU_ARGS(root)),
        gpus=hostdev_gpus,
        vcpus=int(root.findtext("vcpu") or 0),
        memory_kib=_kib(root.find("memory")),
        dialect=None if mark is None else mark.findtext("t:dialect", namespaces=_NS),
        overlay=None if mark is None else mark.findtext("t:overlay", namespaces=_NS),
        seed=None if mark is None else mark.findtext("t:seed", namespaces=_NS),
        started=_float(run.get("started")) if run is not None else None,
    )


def _float(text: str | None) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


_UNIT_KIB = {"b": 1 / 1024, "bytes": 1 / 1024, "k": 1, "kib": 1, "m": 1024, "mib": 1024,
             "g": 1024**2, "gib": 1024**2, "t": 1024**3, "tib": 1024**3}


def _kib(memory) -> int:
    if memory is None or not memory.text:
        return 0
    return int(int(memory.text) * _UNIT_KIB.get(memory.get("unit", "KiB").lower(), 1))
