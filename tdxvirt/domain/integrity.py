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

from .domainxml import DomainXML
from .tdx_options import POLICY_ALLOWED

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
             managed_save: bool = False, commandline_kept: bool = True) -> list[Problem]:
    """Every way the domain no longer is the TD it was defined as; [] when it is one.

    ``libvirt_version``: the target libvirt's, to expect iommufd hostdevs (>= 12.1);
    ``window_needed_mib``: the MMIO window the hostdevs' BARs need (None: unknown);
    ``managed_save``: libvirt holds a managed-save image of the domain;
    ``commandline_kept``: False for libvirt's test driver, which drops
    ``<qemu:commandline>`` from every domain (so its absence says nothing there)."""
    domain = DomainXML.of(xml)
    if not _intended(domain):
        return []
    name = "NAME" if domain.name is None else shlex.quote(domain.name)  # a command to paste
    edit = f"`tdxvirt repair {name}` puts it back (`--dry-run` shows how)"
    dialect = domain.dialect or ""
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
    if managed_save:
        found.append(Problem("libvirt holds a managed-save image: starting would resume "
                             "saved memory instead of booting a freshly measured TD",
                             f"`virsh managedsave-remove {name}`", kind="managed-save"))
    return found
