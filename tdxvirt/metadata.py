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
    mrtd: str | None = None  # the MRTD predicted at define (single pass), if any
    started: float | None = None  # when tdxvirt started it (live metadata), epoch seconds


_TD = f"{{{NAMESPACE}}}td"
_RUN = f"{{{RUN_NAMESPACE}}}run"
_QEMU_COMMANDLINE = f"{{{QEMU_NS}}}commandline"
_MARK_TEXT = {name: f"{{{NAMESPACE}}}{name}" for name in ("dialect", "overlay", "seed", "mrtd")}


def bdf_of(address) -> str:
    """``dddd:bb:ss.f`` of a libvirt <address domain= bus= slot= function=> element."""
    return "%04x:%02x:%02x.%x" % tuple(
        int(address.get(k), 16) for k in ("domain", "bus", "slot", "function"))


def read_domain_xml(xml: str) -> DomainFacts:
    """One pass over the domain's top-level elements: `list` reads a thousand of these,
    and path lookups per field cost more than parsing the XML itself."""
    return read_domain_root(etree.fromstring(xml.encode()))


def read_domain_root(root) -> DomainFacts:
    """read_domain_xml on an already parsed domain (list also checks its integrity)."""
    name = vcpu = memory = mark = run = None
    tdx, gpus = False, []
    for child in root:
        tag = child.tag
        if tag == "name":
            name = child.text
        elif tag == "vcpu":
            vcpu = child.text
        elif tag == "memory":
            memory = child
        elif tag == "metadata":
            mark = child.find(_TD)
            run = child.find(_RUN)
        elif tag == "devices":
            for hostdev in child.iterchildren("hostdev"):
                address = hostdev.find("source/address")
                if hostdev.get("type") == "pci" and address is not None:
                    gpus.append(bdf_of(address))
        elif tag == "launchSecurity":
            tdx = tdx or child.get("type") == "tdx"
        elif tag == _QEMU_COMMANDLINE:  # the qemu-args dialect
            tdx = tdx or any("tdx-guest" in (arg.get("value") or "") for arg in child)
    marked = {} if mark is None else {k: mark.findtext(t) for k, t in _MARK_TEXT.items()}
    return DomainFacts(
        name=name,
        managed_by_tdxvirt=mark is not None,
        tdx=tdx,
        gpus=tuple(gpus),
        vcpus=int(vcpu or 0),
        memory_kib=_kib(memory),
        dialect=marked.get("dialect"),
        overlay=marked.get("overlay"),
        seed=marked.get("seed"),
        mrtd=marked.get("mrtd"),
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
