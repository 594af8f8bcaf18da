"""Every read of a libvirt domain's XML, in one place: the element and attribute names
tdxvirt looks at, and the few names the template shares with the readers.

A domain is read in one pass over its top-level elements (``list`` reads a thousand
domains: path lookups per rule cost more than parsing the XML), then each question
(its launch security, loader, features, hostdevs, disks, tdxvirt's mark) is a lookup
in what that pass kept. Writing stays in domains/td.xml.j2 (and tdxvirt.lifecycle.repair's
structural fixes); both use the names defined here.
"""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

NAMESPACE = "urn:tdxvirt:td:1"  # tdxvirt's mark: <metadata><tdxvirt:td>
# Live-only runtime facts (start time) live in a namespace of their own, so setting
# them never replaces the persistent tdxvirt:td element.
RUN_NAMESPACE = "urn:tdxvirt:run:1"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
MMIO_FWCFG = "opt/ovmf/X-PciMmio64Mb"  # OVMF's 64-bit MMIO window, passed with -fw_cfg
AGENT_CHANNEL_NAME = "org.qemu.guest_agent.0"

COMMANDLINE = f"{{{QEMU_NS}}}commandline"
_ARG = f"{{{QEMU_NS}}}arg"
_TD = f"{{{NAMESPACE}}}td"
_DIALECT = f"{{{NAMESPACE}}}dialect"


def bdf_of(address) -> str:
    """``dddd:bb:ss.f`` of a libvirt <address domain= bus= slot= function=> element."""
    return "%04x:%02x:%02x.%x" % tuple(
        int(address.get(k), 16) for k in ("domain", "bus", "slot", "function"))


def option_groups(items, value=str) -> list[list]:
    """Command-line items (argument strings, or <qemu:arg> elements with ``value``
    giving their text) grouped as QEMU reads them: an option, then its values."""
    groups: list[list] = []
    for item in items:
        if (value(item) or "").startswith("-") or not groups:
            groups.append([item])
        else:
            groups[-1].append(item)
    return groups


def machine_support(group: list[str]) -> str | None:
    """The confidential-guest-support a ``-machine``/``-M`` group sets (None: it sets
    none; '' when it sets it empty, which unsets it)."""
    if len(group) < 2 or group[0].lstrip("-") not in ("machine", "M"):
        return None
    found = None
    for part in (group[1] or "").split(","):
        key, _, setting = part.partition("=")
        if key == "confidential-guest-support":
            found = setting
    return found


def object_fields(text: str) -> dict[str, str]:
    """An -object's properties: JSON ({"qom-type": ..., "id": ...}) or QEMU's
    key=value list, whose first bare word is the type."""
    import json

    if text.startswith("{"):
        try:
            fields = json.loads(text)
        except ValueError:
            return {}
        return {k: str(v) for k, v in fields.items()} if isinstance(fields, dict) else {}
    fields = {}
    for index, part in enumerate(text.split(",")):
        key, equals, value = part.partition("=")
        if not equals and index == 0:
            fields["qom-type"] = key
        elif equals:
            fields[key] = value
    return fields


def parse(xml: str):
    """The root element of a domain's XML text."""
    return etree.fromstring(xml.encode())


class DomainXML:
    """One domain's XML, indexed in one pass over its top-level elements."""

    def __init__(self, root):
        self.root = root
        top = {}
        for child in root:
            if isinstance(child.tag, str):
                top.setdefault(child.tag, child)
        self.top = top
        metadata = top.get("metadata")
        self.mark = None if metadata is None else metadata.find(_TD)
        self.dialect = None if self.mark is None else (self.mark.findtext(_DIALECT) or "").strip()
        self.qemu_args = [arg.get("value", "") for line in root.iterfind(COMMANDLINE)
                          for arg in line.iterfind(_ARG)]
        launch = top.get("launchSecurity")
        self.launch = launch if launch is not None and launch.get("type") == "tdx" else None
        self._children: dict[str, dict] = {}  # os, features, memoryBacking: indexed when asked
        self._pci = None

    @classmethod
    def of(cls, xml_or_root) -> DomainXML:
        """From XML text, a parsed root, or an already indexed domain."""
        if isinstance(xml_or_root, DomainXML):
            return xml_or_root
        return cls(parse(xml_or_root) if isinstance(xml_or_root, str) else xml_or_root)

    # --- tdxvirt's mark ---------------------------------------------------------------
    @property
    def name(self) -> str | None:
        element = self.top.get("name")
        return None if element is None else element.text

    @property
    def uuid(self) -> str | None:
        """The domain's UUID as libvirt wrote it (lower case), or None."""
        element = self.top.get("uuid")
        return None if element is None or not element.text else element.text.strip().lower()

    @property
    def virt_type(self) -> str | None:
        """<domain type='kvm'|'qemu'>."""
        return self.root.get("type")

    @property
    def cpu_mode(self) -> str | None:
        """<cpu mode=...> (libvirt's default, 'custom', when <cpu> has no mode; None
        without <cpu>)."""
        cpu = self.top.get("cpu")
        return None if cpu is None else cpu.get("mode", "custom")

    @property
    def title(self) -> str | None:
        element = self.top.get("title")
        return None if element is None else (element.text or "")

    @property
    def marked_bdfs(self) -> set[str]:
        """The GPUs and NVSwitches tdxvirt passed through (its metadata)."""
        return set() if self.mark is None else {e.get("bdf") for e in self.mark if e.get("bdf")}

    def mark_text(self, tag: str) -> str | None:
        """The text of tdxvirt's <tdxvirt:TAG> (e.g. mrtd), or None."""
        return None if self.mark is None else self.mark.findtext(f"{{{NAMESPACE}}}{tag}")

    # --- what makes it a TD -----------------------------------------------------------
    def has_tdx_object(self) -> bool:
        """The qemu-args dialect's tdx-guest object is in <qemu:commandline> (or any
        argument names it: how a domain other tools defined is recognised as a TD)."""
        return any("tdx-guest" in a for a in self.qemu_args)

    def qemu_option_groups(self) -> list[tuple[str, list[str]]]:
        """<qemu:arg> values grouped as QEMU reads them: (option without its dashes,
        its values), e.g. ('machine', ['confidential-guest-support=tdx'])."""
        return [(group[0].lstrip("-"), group[1:]) for group in option_groups(self.qemu_args)]

    def tdx_objects(self) -> list[dict[str, str]]:
        """The properties of each tdx-guest object <qemu:commandline> creates."""
        found = []
        for option, values in self.qemu_option_groups():
            if option == "object" and values:
                fields = object_fields(values[0])
                if fields.get("qom-type") == "tdx-guest":
                    found.append(fields)
        return found

    def tdx_object_ids(self) -> set[str]:
        """The ids of the tdx-guest objects <qemu:commandline> creates (``-object`` in
        JSON or key=value form)."""
        ids = set()
        for option, values in self.qemu_option_groups():
            if option != "object" or not values:
                continue
            fields = object_fields(values[0])
            if fields.get("qom-type") == "tdx-guest" and fields.get("id"):
                ids.add(fields["id"])
        return ids

    def commandline_confidential_guest_support(self) -> str | None:
        """The confidential-guest-support <qemu:commandline> gives the machine: QEMU
        merges every -machine, so the last one that names it wins (None: none does)."""
        found = None
        for group in option_groups(self.qemu_args):
            setting = machine_support(group)
            if setting is not None:  # '' too: a later empty setting unsets it
                found = setting
        return found

    def _child(self, parent: str, tag: str):
        """The first <parent><tag> (parent a top-level element)."""
        children = self._children.get(parent)
        if children is None:
            element = self.top.get(parent)
            children = {} if element is None else {
                c.tag: c for c in reversed(element) if isinstance(c.tag, str)}
            self._children[parent] = children
        return children.get(tag)

    def os_child(self, tag: str):
        return self._child("os", tag)

    def feature(self, tag: str):
        return self._child("features", tag)

    def memory_backing(self, tag: str):
        return self._child("memoryBacking", tag)

    @property
    def os_firmware(self) -> str | None:
        """<os firmware='efi'>: libvirt picks the firmware on the host."""
        element = self.top.get("os")
        return None if element is None else element.get("firmware")

    def loader_path(self) -> str:
        loader = self.os_child("loader")
        return "" if loader is None else (loader.text or "").strip()

    def os_text(self, tag: str) -> str:
        """<os><kernel>, <initrd>, <cmdline> as text ('' when absent)."""
        element = self.os_child(tag)
        return "" if element is None else (element.text or "").strip()

    def fwcfg_sysinfo_names(self) -> list[str]:
        """The names of <sysinfo type='fwcfg'> entries."""
        return [entry.get("name", "") for sysinfo in self.root.iterchildren("sysinfo")
                if sysinfo.get("type") == "fwcfg" for entry in sysinfo.iterchildren("entry")]

    def shared_numa_cell(self) -> bool:
        cpu = self.top.get("cpu")
        return cpu is not None and cpu.find("numa/cell[@memAccess='shared']") is not None

    def windows_mib(self) -> list[int | None]:
        """Each -fw_cfg MMIO window's size in MiB (None when unreadable)."""
        sizes = []
        for value in self.qemu_args:
            if value.startswith(f"name={MMIO_FWCFG},"):
                text = value.split("string=", 1)[-1]
                sizes.append(int(text) if text.isdigit() else None)
        return sizes

    # --- devices ----------------------------------------------------------------------
    def devices(self, tag: str):
        """The <devices> children with this tag."""
        devices = self.top.get("devices")
        return () if devices is None else devices.iterchildren(tag)

    def pci_hostdevs(self) -> list[tuple[str, object]]:
        """(BDF, element) of each PCI hostdev with a source address (read once: list
        and its integrity check both ask)."""
        if self._pci is None:
            found = []
            for hostdev in self.devices("hostdev"):
                address = hostdev.find("source/address")
                if hostdev.get("type") == "pci" and address is not None:
                    found.append((bdf_of(address), hostdev))
            self._pci = found
        return self._pci

    def disk_files(self) -> list[tuple[str, str]]:
        """(device: 'disk', 'cdrom', ..., source file) of each file-backed disk."""
        found = []
        for disk in self.devices("disk"):
            source = disk.find("source")
            if source is not None and source.get("file"):
                found.append((disk.get("device", "disk"), source.get("file")))
        return found

    def disk_table(self) -> list[dict]:
        """Each disk as `virsh domblklist --details` lists it: target, device, type and
        source (a file, block device, volume or network name; '' for an empty drive)."""
        found = []
        for disk in self.devices("disk"):
            source, target = disk.find("source"), disk.find("target")
            where = "" if source is None else (
                source.get("file") or source.get("dev") or source.get("volume")
                or source.get("name") or "")
            driver = disk.find("driver")
            found.append({"target": "" if target is None else target.get("dev", ""),
                          "device": disk.get("device", "disk"), "type": disk.get("type", ""),
                          "source": where,
                          "format": None if driver is None else driver.get("type"),
                          "readonly": disk.find("readonly") is not None})
        return found

    def interface_table(self) -> list[dict]:
        """Each NIC as `virsh domiflist` lists it: type, source, model, MAC."""
        found = []
        for interface in self.devices("interface"):
            source, model, mac = (interface.find(tag) for tag in ("source", "model", "mac"))
            where = "" if source is None else (
                source.get("network") or source.get("bridge") or source.get("dev") or "")
            found.append({"type": interface.get("type", ""), "source": where,
                          "model": None if model is None else model.get("type"),
                          "mac": None if mac is None else mac.get("address")})
        return found

    def emulator(self) -> str:
        devices = self.top.get("devices")
        return "" if devices is None else (devices.findtext("emulator") or "").strip()

    def agent_channel(self):
        """The guest agent's virtio channel <target> (its state attribute: connected or
        not), or None."""
        for channel in self.devices("channel"):
            target = channel.find("target")
            if target is not None and target.get("type") == "virtio" \
                    and target.get("name") == AGENT_CHANNEL_NAME:
                return target
        return None


# --- the facts list and show print (read in one loop: list reads a thousand) --------

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
    rtmr1: str | None = None  # RTMR1/RTMR2 predicted at define (direct kernel boot), if any
    rtmr2: str | None = None
    started: float | None = None  # when tdxvirt started it (live metadata), epoch seconds


_RUN = f"{{{RUN_NAMESPACE}}}run"
_MARK_TEXT = {name: f"{{{NAMESPACE}}}{name}"
              for name in ("dialect", "overlay", "seed", "mrtd", "rtmr1", "rtmr2")}


def read_domain_xml(xml: str) -> DomainFacts:
    """One pass over the domain's top-level elements: `list` reads a thousand of these,
    and path lookups per field cost more than parsing the XML itself."""
    return read_domain_root(etree.fromstring(xml.encode()))


def read_domain_root(root) -> DomainFacts:
    """read_domain_xml on an already parsed domain."""
    return facts_of(DomainXML(root))


def facts_of(domain: DomainXML) -> DomainFacts:
    """The facts of an indexed domain (list indexes each domain once, then reads its
    facts and checks its integrity from the same index)."""
    top = domain.top
    name, vcpu = top.get("name"), top.get("vcpu")
    marked = {} if domain.mark is None else {
        child.tag: child.text for child in domain.mark if isinstance(child.tag, str)}
    metadata = top.get("metadata")
    run = None if metadata is None else metadata.find(_RUN)
    return DomainFacts(
        name=None if name is None else name.text,
        managed_by_tdxvirt=domain.mark is not None,
        tdx=domain.launch is not None or domain.has_tdx_object(),
        gpus=tuple(bdf for bdf, _ in domain.pci_hostdevs()),
        vcpus=_int(None if vcpu is None else vcpu.text),
        memory_kib=_kib(top.get("memory")),
        dialect=marked.get(_MARK_TEXT["dialect"]),
        overlay=marked.get(_MARK_TEXT["overlay"]),
        seed=marked.get(_MARK_TEXT["seed"]),
        mrtd=marked.get(_MARK_TEXT["mrtd"]),
        rtmr1=marked.get(_MARK_TEXT["rtmr1"]),
        rtmr2=marked.get(_MARK_TEXT["rtmr2"]),
        started=_float(run.get("started")) if run is not None else None,
    )


def _int(text: str | None) -> int:
    """A count libvirt writes as digits; 0 for anything else (a hostile host's XML)."""
    text = (text or "").strip()
    return int(text) if text.isdigit() else 0


def _float(text: str | None) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


_UNIT_KIB = {"b": 1 / 1024, "bytes": 1 / 1024, "k": 1, "kib": 1, "m": 1024, "mib": 1024,
             "g": 1024**2, "gib": 1024**2, "t": 1024**3, "tib": 1024**3}


def _kib(memory) -> int:
    if memory is None or not memory.text or not memory.text.strip().isdigit():
        return 0
    return int(int(memory.text) * _UNIT_KIB.get(memory.get("unit", "KiB").lower(), 1))
