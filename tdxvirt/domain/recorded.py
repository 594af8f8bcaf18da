"""A TD record (tdxvirt.domain.record) from a domain's XML that root trusts: the XML
define just rendered, or the one root looked at and accepted with ``tdxvirt adopt``."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from lxml import etree

from .domainxml import COMMANDLINE, NAMESPACE, DomainXML
from .record import TDRecord


def record_from(xml_or_root, uuid: str, *, loader: str | None = None, adopted: bool = False,
                host_path=None, unread: list[str] | None = None, emulator: str | None = None) -> TDRecord:
    """The record of this domain as its XML says now. ``loader``: the firmware libvirt
    chose at define when the XML let it pick (<os firmware='efi'>); ``emulator``: the QEMU
    libvirt chose when the XML named none. ``host_path``: where
    this process reads a path of the TD's host (its HostRoot's ``path``); given, the
    SHA-256 and size of the firmware, kernel and initrd are recorded too
    (tdxvirt.domain.recordfiles; a DigestError when one cannot be read, or, given the
    list ``unread``, that file left without a digest and named there)."""
    domain = DomainXML.of(xml_or_root)
    launch = domain.launch
    policy = None
    if launch is not None:
        policy = int((launch.findtext("policy") or "0").strip().removeprefix("0x"), 16)
    else:
        from .integrity import object_attributes

        objects = domain.tdx_objects()
        policy = object_attributes(objects[0]) if objects else None

    def launch_text(tag):
        return None if launch is None else ((launch.findtext(tag) or "").strip() or None)

    record = TDRecord(
        uuid=uuid.lower(), name=domain.name or "", dialect=domain.dialect or (
            "native" if launch is not None else "qemu-args"),
        policy=policy, mr_config_id=launch_text("mrConfigId"), mr_owner=launch_text("mrOwner"),
        mr_owner_config=launch_text("mrOwnerConfig"),
        loader=domain.loader_path() or loader,
        emulator=domain.emulator() or emulator,
        kernel=domain.os_text("kernel") or None, initrd=domain.os_text("initrd") or None,
        cmdline=domain.os_text("cmdline") or None,
        mrtd=domain.mark_text("mrtd"), rtmr1=domain.mark_text("rtmr1"), rtmr2=domain.mark_text("rtmr2"),
        gpus=tuple(sorted(bdf for bdf, _ in domain.pci_hostdevs())),
        qemu_args=tuple(domain.qemu_args),
        cpu_mode=domain.cpu_mode or "host-passthrough",
        protected=protected_fragment(domain, loader),
        overlay=domain.mark_text("overlay"), seed=domain.mark_text("seed"),
        title=domain.title, adopted=adopted,
    )
    if host_path is None:
        return record
    from dataclasses import replace

    from .recordfiles import LIMITS, digests_of

    return replace(record, digests=digests_of({field: getattr(record, field) for field in LIMITS},
                                              host_path, unread))


def protected_fragment(domain: DomainXML, loader: str | None = None) -> str:
    """<tdxvirt:protected> with the loader, <launchSecurity> and <qemu:commandline> of
    this domain: what repair puts back."""
    protected = etree.Element(f"{{{NAMESPACE}}}protected", nsmap={"tdxvirt": NAMESPACE})
    element = domain.os_child("loader")
    if element is not None:
        protected.append(_copy(element))
    elif loader:
        etree.SubElement(protected, "loader", type="rom", readonly="yes").text = loader
    for tag in ("launchSecurity", COMMANDLINE):
        element = domain.top.get(tag)
        if element is not None:
            protected.append(_copy(element))
    return etree.tostring(protected, encoding="unicode")


def _copy(element):
    duplicate = copy.deepcopy(element)
    duplicate.tail = None
    return duplicate


def parse_protected(text: str):
    """The record's <tdxvirt:protected> element (None when it holds none)."""
    if not text:
        return None
    return etree.fromstring(text.encode(), etree.XMLParser(resolve_entities=False, no_network=True))


_MARKED_MEASUREMENTS = ("mrtd", "rtmr1", "rtmr2")


def reference_xml(xml: str, record: TDRecord) -> tuple[str, list[str]]:
    """The domain's XML with every reference a prediction reads taken from root's record
    (firmware, kernel, initrd, command line, the measurements define predicted), and how
    the live definition differs from it: ``measure`` and ``guest attest`` predict from
    this, never from paths a libvirt user can point at another file."""
    root = etree.fromstring(xml.encode(), etree.XMLParser(resolve_entities=False, no_network=True))
    domain = DomainXML(root)
    differences = []
    os_element = root.find("os")
    if os_element is None:
        os_element = etree.SubElement(root, "os")
    for tag, wanted in (("loader", record.loader), ("kernel", record.kernel),
                        ("initrd", record.initrd), ("cmdline", record.cmdline)):
        now = domain.os_text(tag) or None
        if now != wanted:
            differences.append(f"<{tag}> is {now or 'unset'}, root's record says {wanted or 'unset'}")
        for old in os_element.findall(tag):
            os_element.remove(old)
        if wanted is not None:
            element = etree.SubElement(os_element, tag)
            element.text = wanted
            if tag == "loader":
                element.set("type", "rom")
    mark = domain.mark
    if mark is None:
        metadata = root.find("metadata")
        if metadata is None:
            metadata = etree.SubElement(root, "metadata")
        mark = etree.SubElement(metadata, f"{{{NAMESPACE}}}td", nsmap={"tdxvirt": NAMESPACE})
    for tag in _MARKED_MEASUREMENTS:
        for old in mark.findall(f"{{{NAMESPACE}}}{tag}"):
            mark.remove(old)
        if getattr(record, tag):
            etree.SubElement(mark, f"{{{NAMESPACE}}}{tag}").text = getattr(record, tag)
    return etree.tostring(root, encoding="unicode"), differences


@dataclass(frozen=True)
class PredictionBasis:
    """What ``measure`` and ``guest attest`` predict from: root's record of the TD (then
    ``xml`` carries its references) or nothing trusted (then no file the XML names is
    read: only files the user names with --firmware/--kernel/--initrd are)."""

    xml: str
    trusted: bool
    source: str
    differences: tuple[str, ...] = ()  # how the live definition differs from the record
    record: TDRecord | None = None

def prediction_basis(uri: str, uuid: str, xml: str) -> PredictionBasis:
    from ..virt.conn import is_remote
    from .record import RecordError, local_store

    if is_remote(uri):
        return PredictionBasis(xml, False, "no root-owned record here: the TD's host holds its "
                               "records (`tdxvirt adopt` there); files given with --firmware, "
                               "--kernel, --initrd only")
    try:
        record = local_store().read(uuid)
    except RecordError as error:
        return PredictionBasis(xml, False, str(error))
    if record is None:
        return PredictionBasis(xml, False, "no root-owned record of this TD (`tdxvirt adopt` "
                               "records it): the paths in its XML are a libvirt user's to change, "
                               "so only files given with --firmware, --kernel, --initrd are read")
    reference, differences = reference_xml(xml, record)
    return PredictionBasis(reference, True, "root's record of this TD", tuple(differences), record)
