"""Bring an edited TD back to what tdxvirt defined, keeping the compatible edits.

tdxvirt.domain.integrity finds each way a domain stopped being the TD it was defined as; this
module fixes exactly those, one fix per problem kind, on a copy of the domain's own
XML. Everything else (vCPUs, memory, disks and NICs added, names) stays as the user
left it, so a repair never undoes virt-xml's or virt-manager's compatible work.

What the fixes put back comes from ``<tdxvirt:protected>`` in tdxvirt's metadata: the
firmware loader, the ``<launchSecurity>`` and the ``<qemu:commandline>`` exactly as
define wrote them (domains/td.xml.j2 writes them twice). A TD defined before that
element existed, or by another tool, gets tdxvirt's defaults instead, and the repair
says so: policy 0x10000000 (SEPT #VE disabled, no debug), and libvirt's own choice of
a firmware with the ``intel-tdx`` feature (``<os firmware='efi'>``).

The MMIO window is sized for the hostdevs the domain has *now* (a GPU added since
define needs a larger one), from the host's facts, else ``--mmio-window``, else the
window define recorded.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field

from lxml import etree

from ..domain.domainxml import MMIO_FWCFG, QEMU_NS, DomainXML, machine_support, option_groups
from ..domain.integrity import Problem, foreign_groups, intended_tdx, problems
from ..domain.record import TDRecord
from ..domain.recorded import parse_protected
from ..errors import InputError

DEFAULT_POLICY = "0x10000000"
_QEMU = f"{{{QEMU_NS}}}"


@dataclass
class Repair:
    """The repaired domain XML, what changed, and the diff from the current XML."""

    name: str
    before: str
    after: str
    changes: list[str] = field(default_factory=list)
    remove_managed_save: bool = False
    left: list[Problem] = field(default_factory=list)  # problems no fix could address
    running: bool = False  # a repair of a running TD takes effect at its next start
    is_td: bool = True  # False: a plain VM or another tool's non-TDX domain (nothing to keep)

    @property
    def needed(self) -> bool:
        return bool(self.changes) or self.remove_managed_save

    def diff(self) -> str:
        # the definition is read with its secrets (so a redefine keeps them): the diff is
        # of copies whose secret attributes are blanked through the parser, never by text
        before, after = _redacted(self.before), _redacted(self.after)
        return "\n".join(difflib.unified_diff(before.splitlines(), after.splitlines(),
                                               "current definition", "repaired definition",
                                               lineterm=""))


_SECRET_ATTRIBUTES = ("passwd", "password", "secret", "key")


def _redacted(xml: str) -> str:
    root = etree.fromstring(xml.encode(), etree.XMLParser(resolve_entities=False))
    for element in root.iter():
        if not isinstance(element.tag, str):
            continue
        for attribute in element.attrib:
            if etree.QName(attribute).localname.lower() in _SECRET_ATTRIBUTES:
                element.set(attribute, "***")
    return _text(root)


def plan_repair(xml: str, *, libvirt_version: int | None, window_needed_mib=None,
                window_override: int | None = None, managed_save: bool = False,
                commandline_kept: bool = True, record=None,
                memory_snapshots: tuple[str, ...] = ()) -> Repair:
    """What repairing this domain XML changes; nothing is changed here.

    The arguments are tdxvirt.domain.integrity.problems' (the host's facts and root's
    record of the TD), plus ``window_override`` (--mmio-window, bytes)."""
    # re-indented before and after, so the diff shows the changes and nothing else
    root = etree.fromstring(xml.encode(), etree.XMLParser(remove_blank_text=True))
    etree.indent(root, "  ")
    name = root.findtext("name") or "?"
    found = problems(root, libvirt_version=libvirt_version, window_needed_mib=window_needed_mib,
                     managed_save=managed_save, commandline_kept=commandline_kept, record=record,
                     memory_snapshots=memory_snapshots)
    before = _text(root)
    fixed = copy.deepcopy(root)
    fixer = _Fixer(fixed, window_needed_mib, window_override,
                   record if isinstance(record, TDRecord) else None)
    left, applied = [], set()
    for problem in found:
        if problem.kind == "managed-save":
            continue
        fix = _FIXES.get(problem.kind)
        if fix is None:
            left.append(problem)
        elif fix not in applied:  # e.g. a missing and a doubled window: one fix
            applied.add(fix)
            fix(fixer)
    fixer.title()
    etree.indent(fixed, "  ")
    after = _text(fixed)
    if after != before:
        # what is still wrong after the fixes (each fix only touches its own elements)
        left += [p for p in problems(fixed, libvirt_version=libvirt_version,
                                     window_needed_mib=window_needed_mib,
                                     commandline_kept=commandline_kept, record=record,
                                     memory_snapshots=memory_snapshots)
                 if p.kind not in {q.kind for q in left}]
    return Repair(name, before, after, fixer.changes, managed_save, left,
                  is_td=record is not None or intended_tdx(root))


def _text(root) -> str:
    return etree.tostring(root, encoding="unicode") + "\n"


class _Fixer:
    """The fixes, each changing only the elements its problem is about."""

    def __init__(self, root, window_needed_mib, window_override, record=None):
        self.root = root
        self.changes: list[str] = []
        self.window_needed_mib = window_needed_mib
        self.window_override = window_override
        self.record = record
        # what define rendered, from root's record only: the <tdxvirt:protected> copy in
        # the domain's metadata is editable by any libvirt user and never read here
        self.protected = None if record is None else parse_protected(record.protected)

    def _recorded(self, tag: str):
        """A copy of the element define recorded, or None."""
        found = None if self.protected is None else self.protected.find(tag)
        return None if found is None else copy.deepcopy(found)

    def title(self) -> None:
        """The title define set (GUIs show it: how a person sees the domain is a TD);
        not a protection, so a changed title is no problem, only put back here."""
        wanted = None if self.record is None else self.record.title
        if not wanted or self.root.findtext("title") == wanted:
            return
        title = self.root.find("title")
        if title is None:
            title = etree.Element("title")
            anchor = self.root.find("uuid")
            anchor = self.root.find("name") if anchor is None else anchor
            self.root.insert(0 if anchor is None else self.root.index(anchor) + 1, title)
        title.text = wanted
        self.changes.append(f"put back the title {wanted!r}")

    def _child(self, parent_tag: str):
        parent = self.root.find(parent_tag)
        if parent is None:
            parent = etree.SubElement(self.root, parent_tag)
        return parent

    def launch_security(self) -> None:
        for old in self.root.findall("launchSecurity"):
            self.root.remove(old)
        recorded = self._recorded("launchSecurity")
        if recorded is not None:
            self.root.append(recorded)
            self.changes.append("put back <launchSecurity type='tdx'> as tdxvirt defined it")
            return
        launch = etree.SubElement(self.root, "launchSecurity", type="tdx")
        etree.SubElement(launch, "policy").text = DEFAULT_POLICY
        self.changes.append(f"put back <launchSecurity type='tdx'> with tdxvirt's default policy "
                            f"{DEFAULT_POLICY} (this TD's own was not recorded: it was defined by "
                            "another tool or an older tdxvirt)")

    def policy(self) -> None:
        """Only the policy: the quote service and MR values the user set stay."""
        recorded = self._recorded("launchSecurity")
        value = DEFAULT_POLICY if recorded is None else (recorded.findtext("policy") or DEFAULT_POLICY)
        launch = self.root.find("launchSecurity")
        policy = launch.find("policy")
        if policy is None:
            policy = etree.SubElement(launch, "policy")
        policy.text = value
        self.changes.append(f"set the TDX policy back to {value}"
                            + ("" if recorded is not None else " (tdxvirt's default: this TD's own "
                               "was not recorded)"))

    def loader(self) -> None:
        os_element = self._child("os")
        for old in os_element.findall("loader"):
            os_element.remove(old)
        recorded = self._recorded("loader")
        if recorded is not None:
            recorded.tail = None
            os_type = os_element.find("type")
            os_element.insert(0 if os_type is None else os_element.index(os_type) + 1, recorded)
            # an explicit loader replaces libvirt's choice (and the features it chose by)
            os_element.attrib.pop("firmware", None)
            for chosen in os_element.findall("firmware"):
                os_element.remove(chosen)
            self.changes.append(f"put back the firmware {recorded.text} as ROM")
        else:
            # libvirt then picks, on the host, a firmware whose descriptor has intel-tdx
            os_element.set("firmware", "efi")
            self.changes.append("let libvirt pick a TDX firmware (<os firmware='efi'>): this TD's own "
                                "loader was not recorded; its MRTD follows that firmware")

    def loader_type(self) -> None:
        self.loader()

    def nvram(self) -> None:
        os_element = self._child("os")
        for old in os_element.findall("nvram"):
            os_element.remove(old)
        self.changes.append("remove <nvram> (a TD keeps no UEFI variables)")

    def _feature(self, tag: str, **attributes) -> None:
        features = self._child("features")
        element = features.find(tag)
        if element is None:
            element = etree.SubElement(features, tag)
        element.attrib.clear()
        element.attrib.update(attributes)

    def irqchip(self) -> None:
        self._feature("ioapic", driver="qemu")
        self.changes.append("put back the split irqchip (<ioapic driver='qemu'/>)")

    def smm(self) -> None:
        self._feature("smm", state="off")
        self.changes.append("turn SMM off")

    def pmu(self) -> None:
        self._feature("pmu", state="off")
        self.changes.append("turn the PMU off")

    def shared_memory(self) -> None:
        backing = self.root.find("memoryBacking")
        if backing is not None:
            for access in backing.findall("access"):
                backing.remove(access)
            for source in backing.findall("source"):
                source.set("type", "anonymous")  # tdxvirt's shared side (domains/td.xml.j2)
        for cell in self.root.findall("cpu/numa/cell[@memAccess='shared']"):
            del cell.attrib["memAccess"]
        self.changes.append("make its memory private to QEMU again (no shared access)")

    def hugepages(self) -> None:
        backing = self.root.find("memoryBacking")
        for pages in backing.findall("hugepages"):
            backing.remove(pages)
        for source in backing.findall("source"):
            source.set("type", "anonymous")
        self.changes.append("remove the huge pages backing")

    def qemu_args(self) -> None:
        """Drop every QEMU argument tdxvirt did not write (with a record: exactly the
        recorded ones stay, the MMIO window aside)."""
        if self.record is not None:
            self.tdx_object()
            return
        line = self._commandline()
        foreign = foreign_groups(DomainXML(self.root), None, DomainXML(self.root).dialect or "")
        for index, group in enumerate(_option_groups(list(line))):
            if index in foreign:
                for arg in group:
                    line.remove(arg)
        self.changes.append("removed the QEMU arguments tdxvirt did not write")

    def cpu_mode(self) -> None:
        wanted = self.record.cpu_mode if self.record is not None else "host-passthrough"
        cpu = self.root.find("cpu")
        if cpu is None:
            cpu = etree.SubElement(self.root, "cpu")
        for attribute in ("match", "check", "migratable"):
            cpu.attrib.pop(attribute, None)
        for child in list(cpu):
            if child.tag in ("model", "vendor", "feature"):
                cpu.remove(child)
        cpu.set("mode", wanted)
        self.changes.append(f"set the CPU mode back to {wanted}")

    def boot(self) -> None:
        os_element = self._child("os")
        for tag in ("kernel", "initrd", "cmdline"):
            for old in os_element.findall(tag):
                os_element.remove(old)
            value = getattr(self.record, tag)
            if value is not None:
                etree.SubElement(os_element, tag).text = value
        self.changes.append("put back the kernel, initrd and command line as defined")

    def tdx_object(self) -> None:
        if self.record is not None:
            self._commandline_from_record()
            return
        recorded = self._recorded(f"{_QEMU}commandline")
        if recorded is None:
            raise InputError(
                f"{self.root.findtext('name')!r} lost its tdx-guest protection and tdxvirt did not record "
                "its QEMU arguments (defined by another tool or an older tdxvirt): undefine it and "
                "`tdxvirt define` it again")
        line = self._commandline()
        kept = _option_groups(list(line))
        ours = _option_groups(list(recorded))
        ours_values = [_values(group) for group in ours]
        for arg in list(line):
            line.remove(arg)
        # tdxvirt's arguments first, as defined; then the user's own, in their order, but
        # none that points the machine's confidential-guest-support elsewhere
        users = [g for g in kept if _values(g) not in ours_values and not _sets_support(g)]
        for group in ours + users:
            for arg in group:
                arg.tail = None
                line.append(copy.deepcopy(arg))
        self.changes.append("put back the tdx-guest object and the QEMU arguments tdxvirt defined")

    def _commandline_from_record(self) -> None:
        """<qemu:commandline> as recorded (the MMIO window as it is now: the window fixes
        size it); every other argument goes."""
        line = self._commandline()
        windows = [list(group) for group in _option_groups(list(line))
                   if _values(group)[0] == "-fw_cfg" and len(group) == 2
                   and (group[1].get("value") or "").startswith(f"name={MMIO_FWCFG},")]
        for arg in list(line):
            line.remove(arg)
        recorded = [g for g in option_groups(list(self.record.qemu_args))
                    if not (g[0] == "-fw_cfg" and len(g) == 2 and g[1].startswith(f"name={MMIO_FWCFG},"))]
        for group in recorded:
            for value in group:
                etree.SubElement(line, f"{_QEMU}arg", value=value)
        for group in windows:
            for arg in group:
                arg.tail = None
                line.append(arg)
        self.changes.append("put back the QEMU arguments tdxvirt recorded (and only those)")

    def support_override(self) -> None:
        """Drop confidential-guest-support from every -machine of <qemu:commandline>
        (libvirt sets it from <launchSecurity>); a -machine left empty goes."""
        line = self._commandline()
        for group in _option_groups(list(line)):
            if not _sets_support(group):
                continue
            kept = [p for p in group[1].get("value").split(",")
                    if p.partition("=")[0] != "confidential-guest-support"]
            if kept:
                group[1].set("value", ",".join(kept))
            else:
                for arg in group:
                    line.remove(arg)
        self.changes.append("removed the -machine confidential-guest-support that overrode "
                            "libvirt's TDX launch security")

    def _commandline(self):
        line = self.root.find(f"{_QEMU}commandline")
        if line is None:
            line = etree.SubElement(self.root, f"{_QEMU}commandline", nsmap={"qemu": QEMU_NS})
        return line

    def window(self) -> None:
        size = self._window_size()
        line = self._commandline()
        args = list(line)
        for index, arg in enumerate(args):
            if (arg.get("value") or "").startswith(f"name={MMIO_FWCFG},"):
                line.remove(arg)
                if index and args[index - 1].get("value") == "-fw_cfg":
                    line.remove(args[index - 1])
        etree.SubElement(line, f"{_QEMU}arg", value="-fw_cfg")
        etree.SubElement(line, f"{_QEMU}arg", value=f"name={MMIO_FWCFG},string={size}")
        self.changes.append(f"set the 64-bit MMIO window to {size} MiB (for the hostdevs it has now)")

    def _window_size(self) -> int:
        from ..domain.policy import window_mb_for
        from ..units import MIB, human

        needed = None
        if self.window_needed_mib is not None:
            needed = self.window_needed_mib([bdf for bdf, _ in DomainXML(self.root).pci_hostdevs()])
        if self.window_override is not None:  # bytes (--mmio-window), sized as define sizes it
            window = window_mb_for(-(-self.window_override // MIB))
            if needed is not None and window < needed:
                raise InputError(f"--mmio-window {human(self.window_override)} is smaller than the "
                                 f"{human(needed * MIB)} the hostdevs' BARs need; drop --mmio-window "
                                 f"or give at least {human(needed * MIB)}")
            return window
        if needed is not None:
            return needed
        recorded = self._recorded(f"{_QEMU}commandline")
        for arg in () if recorded is None else recorded:
            value = arg.get("value") or ""
            if value.startswith(f"name={MMIO_FWCFG},string="):
                text = value.rsplit("=", 1)[1]
                if text.isdigit():
                    return int(text)
        raise InputError(
            f"the MMIO window {self.root.findtext('name')!r} needs cannot be sized: its hostdevs' BAR "
            "sizes are unknown and define recorded none; give --mmio-window SIZE (e.g. 256G)")

    def iommufd(self) -> None:
        domain = DomainXML(self.root)
        marked = domain.marked_bdfs
        fixed = []
        for bdf, hostdev in domain.pci_hostdevs():
            if marked and bdf not in marked:
                continue
            driver = hostdev.find("driver")
            if driver is None:
                driver = etree.Element("driver")
                hostdev.insert(0, driver)
            if driver.get("iommufd") != "yes":
                driver.set("name", "vfio")
                driver.set("iommufd", "yes")
                fixed.append(bdf)
        self.changes.append(f"pass {', '.join(fixed)} through iommufd again")


def _option_groups(args) -> list[list]:
    """<qemu:arg> elements grouped as QEMU reads them: an option and its values."""
    return option_groups(args, _values_of)


def _values_of(arg) -> str:
    return arg.get("value") or ""


def _sets_support(group) -> bool:
    """A -machine (or -M) group that sets confidential-guest-support."""
    return machine_support(_values(group)) is not None


def _values(group) -> list[str]:
    return [_values_of(arg) for arg in group]


_FIXES = {
    "launch-security": _Fixer.launch_security,
    "policy": _Fixer.policy,
    "loader": _Fixer.loader,
    "loader-type": _Fixer.loader_type,
    "nvram": _Fixer.nvram,
    "irqchip": _Fixer.irqchip,
    "smm": _Fixer.smm,
    "pmu": _Fixer.pmu,
    "shared-memory": _Fixer.shared_memory,
    "hugepages": _Fixer.hugepages,
    "tdx-object": _Fixer.tdx_object,
    "support-override": _Fixer.support_override,
    "window-missing": _Fixer.window,
    "window-small": _Fixer.window,
    "window-twice": _Fixer.window,
    "iommufd": _Fixer.iommufd,
    "qemu-args": _Fixer.qemu_args,
    "cpu-mode": _Fixer.cpu_mode,
    "boot": _Fixer.boot,
}


# virDomainXMLFlags: the persistent definition (a running TD's next boot), with its
# secrets, as `virsh edit` reads it (without SECURE a redefine would drop passwords)
_XML_SECURE, _XML_INACTIVE = 1, 2


def repair_td(conn, host, name, *, dry_run: bool = False,
              window_override: int | None = None) -> Repair:
    """Repair the TD ``name`` on ``conn`` (``host``: this machine's HostRoot or the
    host's facts, tdxvirt.facts.facts_for); with ``dry_run`` only say what would change.

    Nothing is changed unless every problem has a fix; a failure after the redefine
    (libvirt rewrote the XML into something still broken, or the managed-save image
    cannot be removed) puts the previous definition back. The image is removed last,
    after the repaired definition checked clean: it cannot be put back."""
    from .. import locks
    from ..errors import HostNotReadyError
    from ..facts import facts_for
    from ..virt.conn import libvirt_error_type, translate
    from . import tds

    facts = facts_for(conn, host)
    domain = tds.lookup(conn, name)
    name = domain.name()
    xml = tds.parsable_xml(domain.XMLDesc(_XML_SECURE | _XML_INACTIVE))
    if DomainXML.of(xml).name != name:  # a character XML forbids, made readable for lxml
        from ..textsafe import quoted

        raise InputError(f"the name of {quoted(name)} holds characters XML does not allow, so "
                         "tdxvirt cannot redefine it under that name; rename it first "
                         "(`virsh domrename OLD NEW`), then repair it")
    inputs = tds.integrity_inputs(conn, domain, facts)
    repair = plan_repair(xml, window_override=window_override, **inputs)
    repair.running = bool(domain.isActive())
    if repair.left:
        first, more = repair.left[0], repair.left[1:]
        extra = f" (and {len(more)} more: {'; '.join(map(str, more))})" if more else ""
        raise HostNotReadyError(f"tdxvirt cannot repair {name!r}: {first}{extra}; nothing was changed")
    if dry_run or not repair.needed:
        return repair
    error_type = libvirt_error_type()
    with locks.held(locks.gpu_keys(facts.lock_host, tds.read_facts(xml).gpus)):
        # what was planned on is what is replaced: another tool may have redefined it
        if tds.parsable_xml(domain.XMLDesc(_XML_SECURE | _XML_INACTIVE)) != xml:
            raise HostNotReadyError(f"{name!r} was redefined while tdxvirt read it; run "
                                    f"`tdxvirt repair {name}` again to repair the new definition")
        if repair.changes:
            try:
                conn.defineXMLFlags(repair.after, tds.DEFINE_VALIDATE)
            except error_type as error:
                raise translate(error, f"libvirt refused the repaired {name!r} (nothing was changed)") from None
            # checked before the managed-save image goes: that holds the guest's memory
            # and cannot be put back, a definition can
            still = problems(tds.parsable_xml(domain.XMLDesc(_XML_INACTIVE)),
                             **{**inputs, "managed_save": False})
            if still:
                _put_back(conn, xml, name, error_type)
                raise HostNotReadyError(f"{name!r} is still not the TD it was defined as after the "
                                        f"repair: {still[0]}; the previous definition was put back")
        if repair.remove_managed_save:
            try:
                domain.managedSaveRemove(0)
            except error_type as error:
                if repair.changes:
                    _put_back(conn, xml, name, error_type)
                raise translate(error, f"cannot remove the managed-save image of {name!r}; "
                                       "the previous definition was put back") from None
    return repair


def _put_back(conn, xml: str, name: str, error_type) -> None:
    """Redefine the definition the repair replaced; when even that fails, say which
    definition is in place now (the repaired one) and how to look at it."""
    from ..errors import HostNotReadyError

    try:
        conn.defineXMLFlags(xml, 0)
    except error_type as error:
        from ..virt.conn import message

        raise HostNotReadyError(
            f"the repair of {name!r} failed and putting its previous definition back failed too "
            f"({message(error)}): the repaired definition is in place; `tdxvirt show {name}` "
            "lists what is still wrong") from None
