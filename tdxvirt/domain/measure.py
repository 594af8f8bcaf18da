"""What a TD's measurements must be, from what tdxvirt knows of it.

MRTD depends only on the firmware image and the host's page-add order (tdvf.py).
RTMR1/RTMR2 of a directly booted TD (<os><kernel>) are the replay of what TDVF and the
kernel's EFI stub measure (bootmeasure.py, docs/measurements.md); for a TD that boots
from its disk they hold its boot loader's measurements and are not predicted. RTMR0 is
not predicted, and the report says why rather than guess: it holds the firmware's
configuration, among it the ACPI tables QEMU builds at start from the machine type,
memory size, devices and the 64-bit MMIO window, predictable only from the host's own
tables (QEMU's `etc/acpi/tables` fw_cfg of this domain's machine), which tdxvirt does
not read yet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import InputError
from .domainxml import DomainXML
from .tdvf import SINGLE_PASS, TWO_PASS, firmware_mrtd

ORDER_NOTE = {SINGLE_PASS: "upstream KVM (Linux >= 6.16): each page added, then extended",
              TWO_PASS: "all of a section's pages added before any is extended"}
RTMR0_UNKNOWN = ("not predictable without the host's ACPI tables for this domain (QEMU "
                 "builds them at start from machine, memory, devices and MMIO window)")
RTMR12_DISK_BOOT = ("not predicted: the TD boots from its disk (no <kernel>), and RTMR1/RTMR2 "
                    "then hold what its boot loader measures; boot a kernel directly to predict them")


@dataclass(frozen=True)
class Measurements:
    name: str
    firmware: str
    mrtd: str | None
    order: str
    order_note: str
    sections: list[dict] = field(default_factory=list)
    rtmr0: str = RTMR0_UNKNOWN
    rtmr1: str = RTMR12_DISK_BOOT  # 96 hex digits (a prediction) or a sentence saying why not
    rtmr2: str = RTMR12_DISK_BOOT
    unknown: str | None = None  # why MRTD itself is unknown
    recorded: str | None = None  # the MRTD define predicted and recorded (single pass)
    rtmr_events: list[dict] = field(default_factory=list)  # what RTMR1/RTMR2 replay, in order
    rtmr_assumptions: list[str] = field(default_factory=list)  # what the RTMR values assume
    recorded_rtmr1: str | None = None  # the RTMR1/RTMR2 define predicted and recorded
    recorded_rtmr2: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def is_prediction(value: str | None) -> bool:
    """A register value (96 hex digits), not a sentence saying why there is none."""
    return value is not None and len(value) == 96 and all(c in "0123456789abcdef" for c in value)


def option_rom_devices(root) -> list[str]:
    """The devices whose PCI option ROM the firmware would run: QEMU gives every NIC one
    (efi-virtio.rom for virtio), a passed-through device offers its own; <rom enabled='no'/>
    or <rom bar='off'/> hides it. (QEMU's VGA ROMs are legacy-only; OVMF runs none.)"""
    domain = DomainXML.of(root)
    found = []
    for device in domain.devices("interface"):
        if not _rom_off(device):
            model = device.find("model")
            found.append(f"<interface> {model.get('type') if model is not None else device.get('type')}")
    for bdf, device in domain.pci_hostdevs():
        if not _rom_off(device):
            found.append(f"<hostdev> {bdf}")
    return found


def _rom_off(device) -> bool:
    rom = device.find("rom")
    return rom is not None and (rom.get("enabled") == "no" or rom.get("bar") == "off"
                                or rom.get("file") == "")


def predict_boot(root, firmware_file: str | None, read_host_path, kernel_override=None,
                 initrd_override=None, unread_why: str | None = None, qemu_version=None):
    """RTMR1/RTMR2 of the domain ``root``; host paths are read only through
    ``read_host_path`` (None: not readable from here), so a remote TD's files never are;
    ``unread_why``: why they are not (default: they are on the TD's host)."""
    from .bootmeasure import BootPrediction, predict_direct_boot

    domain = DomainXML.of(root)
    kernel, initrd = domain.os_text("kernel"), domain.os_text("initrd")
    for option, override, path, element in (("--kernel", kernel_override, kernel, "<kernel>"),
                                             ("--initrd", initrd_override, initrd, "<initrd>")):
        if override and not path:
            raise InputError(f"{option} FILE stands for the TD's {element}, and it has none: "
                             f"drop {option}")
    if not kernel:
        return BootPrediction(RTMR12_DISK_BOOT, RTMR12_DISK_BOOT, [], [])
    if domain.os_child("shim") is not None:
        why = ("not predicted: the TD boots its kernel through shim (<shim>), which measures "
               "itself and its own policy; boot the kernel without shim to predict them")
        return BootPrediction(why, why, [], [])
    kernel_file = kernel_override or read_host_path(kernel)
    initrd_file = initrd_override or (read_host_path(initrd) if initrd else None)
    for path, local, option in ((kernel, kernel_file, "--kernel"), (initrd, initrd_file, "--initrd")):
        if path and local is None:
            why = (f"not predicted: {path} was not read ({unread_why}); give {option} FILE"
                   if unread_why else f"not predicted: {path} is on the host that runs the TD; "
                   f"copy it here and give {option} FILE")
            return BootPrediction(why, why, [], [])
    firmware = None
    if firmware_file is not None:
        try:
            with open(firmware_file, "rb") as stream:
                firmware = stream.read()
        except OSError:
            firmware = None
    cmdline = domain.os_child("cmdline")  # as written: the firmware measures it byte for byte
    return predict_direct_boot(kernel_file, initrd_file, "" if cmdline is None else cmdline.text or "",
                               firmware, option_rom_devices(domain), qemu_version)


def predict(xml: str, read_firmware_path, order: str = SINGLE_PASS,
            firmware_override: str | None = None, kernel_override: str | None = None,
            initrd_override: str | None = None, unread_why: str | None = None,
            qemu_version: tuple[int, int, int] | None = None) -> Measurements:
    """``read_firmware_path(path)`` maps a host path of the domain (loader, kernel, initrd)
    to a readable file on this machine, or None when the file lives on a host tdxvirt
    cannot read (remote), or must not be read (``unread_why`` says why: no root-owned
    record names it)."""
    domain = DomainXML.of(xml)
    name = domain.name or "?"
    recorded = domain.mark_text("mrtd")
    loader = domain.loader_path()
    if not loader and not firmware_override:
        raise InputError(f"{name!r} names no firmware (<os><loader>); a TD loads TDX firmware "
                         "as ROM: restore the loader, or give --firmware FILE")
    readable = firmware_override or read_firmware_path(loader)
    boot = predict_boot(domain, readable, read_firmware_path, kernel_override, initrd_override,
                        unread_why, qemu_version)
    recorded_rtmrs = {f"recorded_{r}": domain.mark_text(r) for r in ("rtmr1", "rtmr2")}
    if readable is None:
        return Measurements(name, loader, None, order, ORDER_NOTE[order],
                            unknown=f"the firmware {loader} was not read ({unread_why}); give "
                                    "--firmware FILE" if unread_why else
                                    f"the firmware {loader} is on the host that runs the TD; "
                                    "copy it here and give --firmware FILE", recorded=recorded,
                            rtmr1=boot.rtmr1, rtmr2=boot.rtmr2,
                            rtmr_events=[e.as_dict() for e in boot.events],
                            rtmr_assumptions=boot.assumptions, **recorded_rtmrs)
    value, sections = firmware_mrtd(readable, order)
    return Measurements(name, firmware_override or loader, value, order, ORDER_NOTE[order],
                        [{"type": s.kind, "address": f"{s.address:#x}",
                          "pages": s.memory_size // 4096, "extended": bool(s.attributes & 1),
                          "added": not s.attributes & 2} for s in sections],
                        rtmr1=boot.rtmr1, rtmr2=boot.rtmr2, recorded=recorded,
                        rtmr_events=[e.as_dict() for e in boot.events],
                        rtmr_assumptions=boot.assumptions, **recorded_rtmrs)
