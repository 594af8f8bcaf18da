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
each problem by its kind, tdxvirt.repair).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Callable

from lxml import etree

from .metadata import NAMESPACE, QEMU_NS, bdf_of
from .tdx_options import POLICY_ALLOWED

MMIO_FWCFG = "opt/ovmf/X-PciMmio64Mb"
LIBVIRT_HOSTDEV_IOMMUFD = 12_001_000


@dataclass(frozen=True)
class Problem:
    what: str  # what is wrong now
    fix: str  # how to get the TD back
    kind: str = ""  # which rule (tdxvirt.repair fixes each kind)

    def __str__(self) -> str:
        return f"{self.what} ({self.fix})"


_COMMANDLINE = f"{{{QEMU_NS}}}commandline"
_ARG = f"{{{QEMU_NS}}}arg"
_TD = f"{{{NAMESPACE}}}td"
_DIALECT = f"{{{NAMESPACE}}}dialect"


class _Domain:
    """What the rules look at, gathered in one pass over the top-level elements and a
    few children (``list`` checks a thousand domains: path lookups per rule cost more
    than parsing the XML)."""

    def __init__(self, root):
        top = {}
        for child in root:
            if isinstance(child.tag, str):
                top.setdefault(child.tag, child)
        self.top = top
        mark = top["metadata"].find(_TD) if "metadata" in top else None
        self.mark = mark
        self.dialect = None if mark is None else (mark.findtext(_DIALECT) or "").strip()
        self.args = [arg.get("value", "") for line in root.iterfind(_COMMANDLINE)
                     for arg in line.iterfind(_ARG)]
        launch = top.get("launchSecurity")
        self.launch = launch if launch is not None and launch.get("type") == "tdx" else None
        self.children = {tag: {c.tag: c for c in reversed(top[tag]) if isinstance(c.tag, str)}
                         for tag in ("os", "features", "memoryBacking") if tag in top}

    def child(self, parent: str, tag: str):
        return self.children.get(parent, {}).get(tag)


def _intended(domain: _Domain) -> bool:
    if domain.dialect is not None:
        return domain.dialect != "plain"
    return domain.launch is not None or any("tdx-guest" in a for a in domain.args)


def intended_tdx(root) -> bool:
    """tdxvirt's metadata says TD (any dialect but plain); unmarked: TDX in the XML."""
    return _intended(_Domain(root))


def _window_mib(args: list[str]) -> list[int | None]:
    """Each -fw_cfg MMIO window's size in MiB (None when unreadable)."""
    sizes = []
    for value in args:
        if value.startswith(f"name={MMIO_FWCFG},"):
            text = value.split("string=", 1)[-1]
            sizes.append(int(text) if text.isdigit() else None)
    return sizes


def _pci_hostdevs(devices) -> list[tuple[str, object]]:
    """(BDF, element) of each PCI hostdev with a source address."""
    found = []
    for hostdev in () if devices is None else devices.iterchildren("hostdev"):
        address = hostdev.find("source/address")
        if hostdev.get("type") == "pci" and address is not None:
            found.append((bdf_of(address), hostdev))
    return found


def problems(xml: str | etree._Element, *, libvirt_version: int | None = None,
             window_needed_mib: Callable[[list[str]], int | None] | None = None,
             managed_save: bool = False, commandline_kept: bool = True) -> list[Problem]:
    """Every way the domain no longer is the TD it was defined as; [] when it is one.

    ``libvirt_version``: the target libvirt's, to expect iommufd hostdevs (>= 12.1);
    ``window_needed_mib``: the MMIO window the hostdevs' BARs need (None: unknown);
    ``managed_save``: libvirt holds a managed-save image of the domain;
    ``commandline_kept``: False for libvirt's test driver, which drops
    ``<qemu:commandline>`` from every domain (so its absence says nothing there)."""
    root = etree.fromstring(xml.encode()) if isinstance(xml, str) else xml
    domain = _Domain(root)
    if not _intended(domain):
        return []
    top = domain.top
    name = shlex.quote(top["name"].text or "") if "name" in top else "NAME"  # a command to paste
    edit = f"`tdxvirt repair {name}` puts it back (`--dry-run` shows how)"
    dialect = domain.dialect or ""
    args = domain.args
    found: list[Problem] = []

    launch = domain.launch
    if dialect == "qemu-args" or (not dialect and launch is None):
        if commandline_kept and not any("tdx-guest" in a for a in args):
            found.append(Problem("its tdx-guest object is gone from <qemu:commandline>: it would "
                                 "boot as an ordinary, unprotected VM", edit, kind="tdx-object"))
    elif launch is None:
        found.append(Problem("<launchSecurity type='tdx'> was removed: it would boot as an "
                             "ordinary, unprotected VM", edit, kind="launch-security"))
    else:
        policy = (launch.findtext("policy") or "").strip()
        try:
            bad = int(policy.removeprefix("0x"), 16) & ~POLICY_ALLOWED
        except ValueError:
            bad = -1
        if bad:
            found.append(Problem(f"TDX policy {policy!r} is not one libvirt allows "
                                 "(only 0x1 debug and 0x10000000 SEPT #VE disable)", edit, kind="policy"))

    loader = domain.child("os", "loader")
    # <os firmware='efi'> with TDX launch security and no loader: libvirt picks, on the
    # host, a firmware whose descriptor has the feature intel-tdx (how tdxvirt defines a
    # TD on a remote host; the qemu driver writes the chosen <loader type='rom'> in at
    # define time, libvirt's test driver never does).
    libvirt_picks = (launch is not None and loader is None
                     and "os" in top and top["os"].get("firmware") == "efi")
    if loader is None or not (loader.text or "").strip():
        if not libvirt_picks:
            found.append(Problem("its firmware (<os><loader>) was removed", edit, kind="loader"))
    elif loader.get("type") != "rom":
        found.append(Problem(f"its firmware is loaded as {loader.get('type') or 'pflash'}, "
                             "not ROM", edit, kind="loader-type"))
    if domain.child("os", "nvram") is not None:
        found.append(Problem("it has NVRAM (a TD keeps no UEFI variables)", edit, kind="nvram"))
    ioapic = domain.child("features", "ioapic")
    if (ioapic is None or ioapic.get("driver") != "qemu") and not any(
            "kernel_irqchip=split" in a for a in args):
        found.append(Problem("the split irqchip (<ioapic driver='qemu'/>) is gone", edit, kind="irqchip"))
    smm = domain.child("features", "smm")
    if smm is None or smm.get("state") != "off":
        found.append(Problem("SMM is no longer off", edit, kind="smm"))
    pmu = domain.child("features", "pmu")
    if pmu is None or pmu.get("state") != "off":
        found.append(Problem("the PMU is no longer off", edit, kind="pmu"))

    access = domain.child("memoryBacking", "access")
    cpu = top.get("cpu")
    if (access is not None and access.get("mode") == "shared") or (
            cpu is not None and cpu.find("numa/cell[@memAccess='shared']") is not None):
        found.append(Problem("its memory is shared with other processes (virt-manager's "
                             "\"Enable shared memory\")", edit, kind="shared-memory"))
    if domain.child("memoryBacking", "hugepages") is not None:
        found.append(Problem("huge pages back only a TD's shared memory and reserve the "
                             "memory twice", edit, kind="hugepages"))

    pci = _pci_hostdevs(top.get("devices"))
    hostdevs = [bdf for bdf, _ in pci]
    windows = _window_mib(args)
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
        marked = {e.get("bdf") for e in (domain.mark if domain.mark is not None else ())
                  if e.get("bdf")} or {bdf for bdf, _ in pci}
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
