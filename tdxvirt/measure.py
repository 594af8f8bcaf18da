"""What a TD's measurements must be, from what tdxvirt knows of it.

MRTD depends only on the firmware image and the host's page-add order (tdvf.py). The
RTMRs are not predicted yet, and the report says why rather than guess:
- RTMR0 holds the firmware's configuration, among it the ACPI tables QEMU builds at
  start from the machine type, memory size, devices and the 64-bit MMIO window: it
  is predictable only from the host's own tables (QEMU's `etc/acpi/tables` fw_cfg of
  this domain's machine), which tdxvirt does not read yet;
- RTMR1/RTMR2 (kernel, initrd, command line) depend on how this firmware build
  measures a directly booted kernel; tdxvirt does not replay that yet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from lxml import etree

from .errors import InputError
from .tdvf import SINGLE_PASS, TWO_PASS, firmware_mrtd

ORDER_NOTE = {SINGLE_PASS: "upstream KVM (Linux >= 6.16): each page added, then extended",
              TWO_PASS: "all of a section's pages added before any is extended"}
RTMR0_UNKNOWN = ("not predictable without the host's ACPI tables for this domain (QEMU "
                 "builds them at start from machine, memory, devices and MMIO window)")
RTMR12_UNKNOWN = "not predicted by this version of tdxvirt"


@dataclass(frozen=True)
class Measurements:
    name: str
    firmware: str
    mrtd: str | None
    order: str
    order_note: str
    sections: list[dict] = field(default_factory=list)
    rtmr0: str = RTMR0_UNKNOWN
    rtmr1: str = RTMR12_UNKNOWN
    rtmr2: str = RTMR12_UNKNOWN
    unknown: str | None = None  # why MRTD itself is unknown
    recorded: str | None = None  # the MRTD define predicted and recorded (single pass)

    def as_dict(self) -> dict:
        return asdict(self)


def predict(xml: str, read_firmware_path, order: str = SINGLE_PASS,
            firmware_override: str | None = None) -> Measurements:
    """``read_firmware_path(path)`` maps the domain's loader path to a readable file on
    this machine, or None when the file lives on a host tdxvirt cannot read (remote)."""
    from .metadata import NAMESPACE

    root = etree.fromstring(xml.encode())
    name = root.findtext("name") or "?"
    recorded = root.findtext(f"metadata/{{{NAMESPACE}}}td/{{{NAMESPACE}}}mrtd")
    loader = (root.findtext("os/loader") or "").strip()
    if not loader and not firmware_override:
        raise InputError(f"{name!r} names no firmware (<os><loader>); a TD loads TDX firmware "
                         "as ROM: restore the loader, or give --firmware FILE")
    readable = firmware_override or read_firmware_path(loader)
    if readable is None:
        return Measurements(name, loader, None, order, ORDER_NOTE[order],
                            unknown=f"the firmware {loader} is on the host that runs the TD; "
                                    "copy it here and give --firmware FILE", recorded=recorded)
    value, sections = firmware_mrtd(readable, order)
    return Measurements(name, firmware_override or loader, value, order, ORDER_NOTE[order],
                        [{"type": s.kind, "address": f"{s.address:#x}",
                          "pages": s.memory_size // 4096, "extended": bool(s.attributes & 1),
                          "added": not s.attributes & 2} for s in sections], recorded=recorded)
