"""Is this TD still a TD? What tdxvirt defined against what the domain XML is now.

TDs are ordinary libvirt domains, so virsh, virt-xml and virt-manager edit them. Some
edits strip a TD's protection (launch security deleted: it boots as an ordinary VM)
or break it far from the cause (the MMIO window removed: the GPU fails inside the
guest). The intent comes from tdxvirt's metadata (its dialect says TD or plain, its
devices which GPUs); a domain other tools defined is judged from its XML alone (a TD
there is one with TDX launch security or a ``tdx-guest`` object).

``problems`` is used by ``show`` (listed), ``list`` (a marker), ``start`` (refused
before anything runs, one line naming what changed and how to restore it; not
overridable, because a TD must never boot unprotected) and ``repair`` (which fixes
each problem by its kind, tdxvirt.lifecycle.repair).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Callable

from lxml import etree

from .domainxml import MMIO_FWCFG, DomainXML, machine_support, object_fields, option_groups
from .record import RecordError, TDRecord
from .tdx_options import POLICY_ALLOWED, POLICY_DEBUG, POLICY_SEPT_VE_DISABLE

LIBVIRT_HOSTDEV_IOMMUFD = 12_001_000


@dataclass(frozen=True)
class Problem:
    what: str  # what is wrong now
    fix: str  # how to get the TD back
    kind: str = ""  # which rule (tdxvirt.lifecycle.repair fixes each kind)

    def __str__(self) -> str:
        return f"{self.what} ({self.fix})"


def _intended(domain: DomainXML) -> bool:
    if domain.dialect is not None:
        return domain.dialect != "plain"
    return domain.launch is not None or domain.has_tdx_object()


def intended_tdx(root) -> bool:
    """tdxvirt's metadata says TD (any dialect but plain); unmarked: TDX in the XML."""
    return _intended(DomainXML.of(root))


def problems(xml: str | etree._Element, *, libvirt_version: int | None = None,
             window_needed_mib: Callable[[list[str]], int | None] | None = None,
             managed_save: bool = False, commandline_kept: bool = True,
             record: TDRecord | RecordError | None = None,
             memory_snapshots: tuple[str, ...] = (), files: tuple | None = ()) -> list[Problem]:
    """Every way the domain no longer is the TD it was defined as; [] when it is one.

    ``libvirt_version``: the target libvirt's, to expect iommufd hostdevs (>= 12.1);
    ``window_needed_mib``: the MMIO window the hostdevs' BARs need (None: unknown);
    ``managed_save``: libvirt holds a managed-save image of the domain;
    ``commandline_kept``: False for libvirt's test driver, which drops
    ``<qemu:commandline>`` from every domain (so its absence says nothing there);
    ``record``: root's record of this TD (tdxvirt.domain.record), the reference when
    there is one (a RecordError: one is there but cannot be trusted; None: judged by
    rules alone); ``memory_snapshots``: names of the domain's snapshots with memory;
    ``files``: the recorded firmware, kernel and initrd against the files at their paths
    on the TD's host (tdxvirt.domain.recordfiles.check; empty or None: not checked here)."""
    domain = DomainXML.of(xml)
    name = "NAME" if domain.name is None else shlex.quote(domain.name)  # a command to paste
    if isinstance(record, RecordError):
        return [Problem(str(record), f"`tdxvirt adopt {name}` records it again after you check it",
                        kind="record")]
    if record is None and not _intended(domain):
        return []
    edit = f"`tdxvirt repair {name}` puts it back (`--dry-run` shows how)"
    dialect = record.dialect if record is not None else (domain.dialect or "")
    args = domain.qemu_args
    found: list[Problem] = []

    launch = domain.launch
    if dialect == "qemu-args" or (not dialect and launch is None):
        # The object alone protects nothing: QEMU uses it only when -machine's
        # confidential-guest-support names it (the last -machine that sets it wins).
        ids = domain.tdx_object_ids()
        support = domain.commandline_confidential_guest_support()
        if commandline_kept and not ids:
            found.append(Problem("its tdx-guest object is gone from <qemu:commandline>: it would "
                                 "boot as an ordinary, unprotected VM", edit, kind="tdx-object"))
        elif commandline_kept and support not in ids:
            found.append(Problem("-machine confidential-guest-support no longer names its tdx-guest "
                                 f"object ({'unset' if support is None else repr(support)}): it would "
                                 "boot as an ordinary, unprotected VM", edit, kind="tdx-object"))
        for fields in domain.tdx_objects():
            attributes = object_attributes(fields)
            if attributes is None:
                found.append(Problem("its tdx-guest object's attributes cannot be read: its "
                                     "protection is unknown", edit, kind="tdx-object"))
            else:
                found += _attribute_problems(attributes, record, edit, "tdx-object")
    else:
        if launch is None:
            found.append(Problem("<launchSecurity type='tdx'> was removed: it would boot as an "
                                 "ordinary, unprotected VM", edit, kind="launch-security"))
        else:
            policy = (launch.findtext("policy") or "").strip()
            try:
                bad = int(policy.removeprefix("0x"), 16) & ~POLICY_ALLOWED
            except ValueError:
                bad = -1
            if bad:
                found.append(Problem(f"TDX policy {policy!r} is not one libvirt allows (only 0x1 "
                                     "debug and 0x10000000 SEPT #VE disable)", edit, kind="policy"))
            else:
                found += _attribute_problems(int(policy.removeprefix("0x"), 16), record, edit, "policy")
            if record is not None:
                found += _launch_values_problems(launch, record, edit)
        if domain.commandline_confidential_guest_support() is not None:
            found.append(Problem("<qemu:commandline> sets -machine confidential-guest-support, "
                                 "overriding libvirt's TDX launch security: it could boot "
                                 "unprotected", edit, kind="support-override"))

    loader = domain.os_child("loader")
    # <os firmware='efi'> with TDX launch security and no loader: libvirt picks, on the
    # host, a firmware whose descriptor has the feature intel-tdx (how tdxvirt defines a
    # TD on a remote host; the qemu driver writes the chosen <loader type='rom'> in at
    # define time, libvirt's test driver never does).
    libvirt_picks = launch is not None and loader is None and domain.os_firmware == "efi"
    if loader is None or not (loader.text or "").strip():
        if not libvirt_picks:
            found.append(Problem("its firmware (<os><loader>) was removed", edit, kind="loader"))
    elif loader.get("type") != "rom":
        found.append(Problem(f"its firmware is loaded as {loader.get('type') or 'pflash'}, "
                             "not ROM", edit, kind="loader-type"))
    elif record is not None and record.loader and (loader.text or "").strip() != record.loader:
        found.append(Problem(f"its firmware is now {(loader.text or '').strip()}, not {record.loader} "
                             "as defined: the TD's MRTD changes with it", edit, kind="loader"))
    if domain.os_child("nvram") is not None:
        found.append(Problem("it has NVRAM (a TD keeps no UEFI variables)", edit, kind="nvram"))
    ioapic = domain.feature("ioapic")
    if (ioapic is None or ioapic.get("driver") != "qemu") and not any(
            "kernel_irqchip=split" in a for a in args):
        found.append(Problem("the split irqchip (<ioapic driver='qemu'/>) is gone", edit, kind="irqchip"))
    smm = domain.feature("smm")
    if smm is None or smm.get("state") != "off":
        found.append(Problem("SMM is no longer off", edit, kind="smm"))
    pmu = domain.feature("pmu")
    if pmu is None or pmu.get("state") != "off":
        found.append(Problem("the PMU is no longer off", edit, kind="pmu"))

    access = domain.memory_backing("access")
    if (access is not None and access.get("mode") == "shared") or domain.shared_numa_cell():
        found.append(Problem("its memory is shared with other processes (virt-manager's "
                             "\"Enable shared memory\")", edit, kind="shared-memory"))
    if domain.memory_backing("hugepages") is not None:
        found.append(Problem("huge pages back only a TD's shared memory and reserve the "
                             "memory twice", edit, kind="hugepages"))

    pci = domain.pci_hostdevs()
    hostdevs = [bdf for bdf, _ in pci]
    windows = domain.windows_mib()
    if hostdevs and not windows and commandline_kept:
        found.append(Problem("the 64-bit MMIO window (-fw_cfg name=opt/ovmf/X-PciMmio64Mb) "
                             "is gone: its GPUs would fail inside the guest", edit, kind="window-missing"))
    elif hostdevs and windows and window_needed_mib is not None:
        needed = window_needed_mib(hostdevs)
        have = max((w or 0) for w in windows)
        if needed is not None and have < needed:
            found.append(Problem(f"its 64-bit MMIO window ({have} MiB) is smaller than its "
                                 f"devices' BARs need ({needed} MiB)", edit, kind="window-small"))
    if len(windows) > 1:
        found.append(Problem("it passes the MMIO window more than once", edit, kind="window-twice"))
    if libvirt_version is not None and libvirt_version >= LIBVIRT_HOSTDEV_IOMMUFD \
            and dialect in ("native", ""):
        # the GPUs and NVSwitches tdxvirt passed (its metadata); unmarked: every hostdev
        marked = domain.marked_bdfs or {bdf for bdf, _ in pci}
        legacy = [bdf for bdf, hostdev in pci
                  if bdf in marked and hostdev.find("driver[@iommufd='yes']") is None]
        if legacy:
            found.append(Problem(f"GPU hostdev {', '.join(legacy)} lost <driver iommufd='yes'/>",
                                 edit, kind="iommufd"))
    found += _foreign_arguments(domain, record, dialect, edit, commandline_kept)
    found += _cpu_problems(domain, record, edit)
    wanted = set(record.gpus) if record is not None else domain.marked_bdfs
    gone = sorted(wanted - {bdf for bdf, _ in pci})
    if gone:
        found.append(Problem(f"GPU hostdev {', '.join(gone)} that it was defined with is gone: it "
                             "would run without it", f"add it back (`virt-xml {name} --add-device "
                             f"--hostdev {gone[0]}`), or `tdxvirt adopt {name}` to record it as it is",
                             kind="gpu-removed"))
    if record is not None:
        found += _boot_problems(domain, record, edit)
        found += _file_problems(files, name)
    else:
        marked_uuid = domain.mark_text("uuid")
        if marked_uuid and domain.uuid and marked_uuid.strip().lower() != domain.uuid:
            found.append(Problem(f"it is a copy (clone) of the TD {marked_uuid.strip()}: it shares that "
                                 "TD's GPUs and measurements and has no record of its own",
                                 f"give it GPUs of its own, then `tdxvirt adopt {name}`; or "
                                 f"`virsh undefine {name}`", kind="clone"))
    for snapshot in memory_snapshots:
        found.append(Problem(f"its snapshot {snapshot!r} holds memory: reverting would resume saved "
                             "memory instead of booting a freshly measured TD",
                             f"`virsh snapshot-delete {name} {shlex.quote(snapshot)}`",
                             kind="memory-snapshot"))
    if managed_save:
        found.append(Problem("libvirt holds a managed-save image: starting would resume "
                             "saved memory instead of booting a freshly measured TD",
                             f"`virsh managedsave-remove {name}`", kind="managed-save"))
    return found


# TD attributes tdxvirt knows by name (Intel TDX module ABI, TDATTRIBUTES)
_ATTRIBUTE_NAMES = {0: "DEBUG", 28: "SEPT_VE_DISABLE", 30: "PKS", 31: "KL", 63: "PERFMON"}


def _attribute_problems(value: int, record: TDRecord | None, fix: str, kind: str) -> list[Problem]:
    """The TD attributes against the record's (without one: debug off, SEPT #VE disabled,
    tdxvirt's own default), each weakening named."""
    found = []
    if value & POLICY_DEBUG and (record is None or not (record.policy or 0) & POLICY_DEBUG):
        found.append(Problem("debug is on (TD attribute DEBUG, policy bit 0): the host can read and "
                             "change the TD's memory", fix, kind=kind))
    if not value & POLICY_SEPT_VE_DISABLE and (record is None or (record.policy or 0) & POLICY_SEPT_VE_DISABLE):
        found.append(Problem("SEPT #VE is enabled (TD attribute SEPT_VE_DISABLE, policy bit 28, "
                             "cleared): the host can inject #VE through EPT violations", fix, kind=kind))
    if record is not None and record.policy is not None and not found and value != record.policy:
        changed = [_ATTRIBUTE_NAMES.get(bit, f"bit {bit}") for bit in range(64)
                   if (value ^ record.policy) >> bit & 1]
        found.append(Problem(f"its TD attributes are {value:#x}, not {record.policy:#x} as defined "
                             f"({', '.join(changed)} changed)", fix, kind=kind))
    return found


def object_attributes(fields: dict[str, str]) -> int | None:
    """A tdx-guest object's TD attributes: ``attributes`` with ``sept-ve-disable`` and
    ``debug`` applied as QEMU applies them (None: unreadable)."""
    try:
        text = fields.get("attributes", "0")
        value = int(text, 0) if not text.isdigit() else int(text)
    except ValueError:
        return None
    for key, bit in (("sept-ve-disable", POLICY_SEPT_VE_DISABLE), ("debug", POLICY_DEBUG)):
        setting = fields.get(key)
        if setting is None:
            continue
        if setting.lower() in ("on", "true", "yes", "1"):
            value |= bit
        elif setting.lower() in ("off", "false", "no", "0"):
            value &= ~bit
        else:
            return None
    return value


_LAUNCH_VALUES = (("mrConfigId", "mr_config_id", "MRCONFIGID"), ("mrOwner", "mr_owner", "MROWNER"),
                  ("mrOwnerConfig", "mr_owner_config", "MROWNERCONFIG"))


def _launch_values_problems(launch, record: TDRecord, fix: str) -> list[Problem]:
    found = []
    for tag, attribute, what in _LAUNCH_VALUES:
        now = (launch.findtext(tag) or "").strip() or None
        if now != getattr(record, attribute):
            found.append(Problem(f"its {what} is {now or 'unset'}, not {getattr(record, attribute) or 'unset'} "
                                 "as defined: attestation would bind another identity",
                                 fix, kind="launch-security"))
    return found


def _foreign_arguments(domain: DomainXML, record: TDRecord | None, dialect: str, fix: str,
                       commandline_kept: bool) -> list[Problem]:
    """QEMU arguments tdxvirt did not write: -readconfig, -set, -global, a second
    -machine or -object... change the machine behind libvirt's back (QEMU reads them
    after libvirt's own), so only the ones recorded at define are accepted."""
    if not commandline_kept:
        return []
    groups = option_groups(domain.qemu_args)
    foreign = [" ".join(groups[index]) for index in sorted(foreign_groups(domain, record, dialect))]
    if not foreign:
        return []
    shown = "; ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    return [Problem(f"<qemu:commandline> passes QEMU arguments tdxvirt did not write ({shown[:300]}): "
                    "QEMU applies them after libvirt's own and they can change the TD behind its back",
                    fix, kind="qemu-args")]


def foreign_groups(domain: DomainXML, record: TDRecord | None, dialect: str) -> set[int]:
    """The indexes of <qemu:commandline>'s option groups tdxvirt did not write: with a
    record, those it does not hold (each recorded group accepted once); without one,
    all but a tdx-guest object and a -machine naming it. The MMIO window is judged by
    its own rules."""
    allowed = None if record is None else option_groups(list(record.qemu_args))
    foreign = set()
    for index, group in enumerate(option_groups(domain.qemu_args)):
        option = group[0].lstrip("-")
        if option == "fw_cfg" and len(group) == 2 and group[1].startswith(f"name={MMIO_FWCFG},"):
            continue
        if allowed is not None:
            if group in allowed:
                allowed.remove(group)
                continue
        elif len(group) == 2 and _ours_by_rule(option, group[1], dialect):
            continue
        foreign.add(index)
    return foreign


def _ours_by_rule(option: str, value: str, dialect: str) -> bool:
    """Without a record: a tdx-guest object, and a -machine that only names one (the
    qemu-args dialect; elsewhere such a -machine is support-override's problem)."""
    if option == "object":
        return object_fields(value).get("qom-type") == "tdx-guest"
    if option in ("machine", "M"):
        if dialect != "qemu-args":
            return machine_support([option, value]) is not None
        return all(part.partition("=")[0] == "confidential-guest-support" for part in value.split(","))
    return False


def _cpu_problems(domain: DomainXML, record: TDRecord | None, fix: str) -> list[Problem]:
    wanted = record.cpu_mode if record is not None else (
        "host-passthrough" if domain.virt_type == "kvm" else None)
    if wanted is None or domain.cpu_mode == wanted:
        return []
    return [Problem(f"its CPU mode is {domain.cpu_mode or 'unset'}, not {wanted}: a TD gets the host's "
                    "CPU as the TDX module allows it, a modelled CPU changes its CPUID and XFAM",
                    fix, kind="cpu-mode")]


def _file_problems(files, name: str) -> list[Problem]:
    """A recorded firmware, kernel or initrd replaced, removed or made unreadable at its
    path: the TD would boot another file than the one its measurements were predicted
    from. Repair cannot put a file back; a person decides which file is right."""
    found = []
    for state in files or ():
        if not state.wrong:
            continue
        if state.state == "changed":
            back = (f"put the recorded file back, or check this one and record it with "
                    f"`tdxvirt adopt {name}` (`tdxvirt build status` tells a tdxvirt build's changed files)")
        else:
            back = ("put the recorded file back (reinstall its package; `tdxvirt build status` tells "
                    "a tdxvirt build's changed files)")
        found.append(Problem(state.what(), back, kind="file"))
    return found


def _boot_problems(domain: DomainXML, record: TDRecord, fix: str) -> list[Problem]:
    """A directly booted kernel, initrd and command line against the record (their
    RTMR predictions hold only for those)."""
    changed = [tag for tag in ("kernel", "initrd", "cmdline")
               if (domain.os_text(tag) or None) != (getattr(record, tag) or None)]
    if not changed:
        return []
    return [Problem(f"its {', '.join(changed)} changed since define: its boot measurements "
                    "(RTMR1/RTMR2) no longer hold", fix, kind="boot")]
