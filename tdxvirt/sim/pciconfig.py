"""A PCI configuration space derived from a device's sysfs values.

libvirt reads a device's ``config`` file before it assigns it (``virPCIDeviceNew``,
the PCIe and FLR checks). The H100 fixture holds the device's sysfs values but not
its config space, so this writes the 4 KiB a device with those values has: the type 0
header (ids, class, revision, subsystem, BARs with the flags sysfs reported) and one
PCI Express endpoint capability (FLR when ``reset_method`` says flr; the link speed
and width sysfs reported). Layout: PCI Local Bus 3.0 §6.1 (header), PCIe Base 5.0
§7.5.3 (PCI Express capability).
"""

from __future__ import annotations

import struct
from pathlib import Path

PCIE_CAP_OFFSET = 0x40
_LINK_SPEEDS = {"2.5": 1, "5.0": 2, "8.0": 3, "16.0": 4, "32.0": 5, "64.0": 6}


def _read(sysfs: Path, name: str, default: str = "0") -> str:
    path = sysfs / name
    return path.read_text().strip() if path.is_file() else default


def _bars(resource: str) -> list[int]:
    """The six BAR registers' values: base address with the sysfs flags' low bits."""
    registers = [0] * 6
    lines = resource.splitlines()
    index = 0
    while index < 6 and index < len(lines):
        start, _end, flags = (int(word, 16) for word in lines[index].split())
        if start:
            is_64 = bool(flags & 0x4)
            registers[index] = (start & 0xFFFFFFF0) | (flags & 0xF)
            if is_64 and index + 1 < 6:
                registers[index + 1] = start >> 32
                index += 1
        index += 1
    return registers


def config_space(sysfs: Path) -> bytes:
    space = bytearray(4096)
    vendor, device = int(_read(sysfs, "vendor"), 16), int(_read(sysfs, "device"), 16)
    klass = int(_read(sysfs, "class"), 16)
    struct.pack_into("<HHHH", space, 0x00, vendor, device, 0x0406, 0x0010)  # mem+master; cap list
    struct.pack_into("<I", space, 0x08, (klass << 8) | int(_read(sysfs, "revision"), 16))
    for number, value in enumerate(_bars(_read(sysfs, "resource", ""))):
        struct.pack_into("<I", space, 0x10 + 4 * number, value)
    struct.pack_into("<HH", space, 0x2C, int(_read(sysfs, "subsystem_vendor"), 16),
                     int(_read(sysfs, "subsystem_device"), 16))
    space[0x34] = PCIE_CAP_OFFSET
    space[0x3D] = 1  # interrupt pin INTA
    flr = 1 << 28 if "flr" in _read(sysfs, "reset_method", "") else 0
    speed = _LINK_SPEEDS.get(_read(sysfs, "max_link_speed", "2.5").split()[0], 1)
    width = int(_read(sysfs, "max_link_width", "1"))
    current = _LINK_SPEEDS.get(_read(sysfs, "current_link_speed", "2.5").split()[0], 1)
    current_width = int(_read(sysfs, "current_link_width", "1"))
    # cap id 0x10, next 0, PCIe caps: version 2, device/port type 0 (endpoint)
    struct.pack_into("<BBH", space, PCIE_CAP_OFFSET, 0x10, 0x00, 0x0002)
    struct.pack_into("<I", space, PCIE_CAP_OFFSET + 0x04, flr | 0x2)  # DevCap: 512 B payload
    struct.pack_into("<I", space, PCIE_CAP_OFFSET + 0x0C, speed | (width << 4))  # LinkCap
    struct.pack_into("<H", space, PCIE_CAP_OFFSET + 0x12, current | (current_width << 4))  # LinkSta
    struct.pack_into("<I", space, PCIE_CAP_OFFSET + 0x24, 1 << 4)  # DevCap2: completion timeout off
    return bytes(space)


def modalias(sysfs: Path) -> str:
    """The kernel's ``modalias`` for the device (drivers/pci/pci-sysfs.c format)."""
    klass = int(_read(sysfs, "class"), 16)
    ids = [int(_read(sysfs, name), 16) for name in
           ("vendor", "device", "subsystem_vendor", "subsystem_device")]
    return ("pci:v%08Xd%08Xsv%08Xsd%08X" % tuple(ids)
            + "bc%02Xsc%02Xi%02X\n" % (klass >> 16, (klass >> 8) & 0xFF, klass & 0xFF))
