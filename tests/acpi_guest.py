"""A tiny real guest that powers off on ACPI's power button, for TDs on the emulated host.

TDX's firmware with no OS ignores ACPI, so a graceful stop cannot be shown with it.
This guest is Debian's own kernel with an initramfs holding Debian's busybox: its init
loads the ACPI button and evdev modules from the same kernel package, runs busybox's
acpid (which runs ``/etc/acpi/PWRF/00000080`` on the power button: ``poweroff -f``),
and says ``tdxvirt-acpi-guest ready`` on the serial console every 2 s. Everything comes out of
Debian packages with ``apt-get download`` and ``dpkg-deb -x``; nothing is installed.
"""

from __future__ import annotations

import lzma
import stat
import tempfile
from pathlib import Path

from test_guest_live_agent import _newc, unpack_with_kernel

READY = "tdxvirt-acpi-guest ready"
APPLETS = ("sh", "mount", "mkdir", "insmod", "acpid", "poweroff", "sleep", "echo")
MODULES = ("kernel/drivers/acpi/button.ko", "kernel/drivers/input/evdev.ko")
INIT = f"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in /lib/modules/*.ko; do insmod "$module"; done
acpid -d -c /etc/acpi > /dev/console 2>&1 &
sleep 1
# said again and again: a console attached later still sees it
while true; do echo "{READY}" > /dev/console; sleep 2; done
"""
POWER_BUTTON = "#!/bin/sh\necho 'tdxvirt-acpi-guest: power button' > /dev/console\npoweroff -f\n"


def _module(root: Path, relative: str) -> bytes:
    """A module from the kernel package, uncompressed (Debian ships .ko or .ko.xz)."""
    [tree] = (root / "lib/modules").iterdir()
    plain = tree / relative
    if plain.is_file():
        return plain.read_bytes()
    return lzma.decompress((tree / (relative + ".xz")).read_bytes())


def build_acpi_guest(directory: Path) -> tuple[Path, Path]:
    """(kernel, initramfs); built once per state directory."""
    kernel, initrd = directory / "vmlinuz", directory / "initrd-acpi.cpio"
    if kernel.exists() and initrd.exists():
        return kernel, initrd
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        root, vmlinuz = unpack_with_kernel(("busybox-static",), Path(scratch))
        entries = [(d, stat.S_IFDIR | 0o755, b"") for d in (
            "bin", "dev", "proc", "sys", "etc", "etc/acpi", "etc/acpi/PWRF", "lib", "lib/modules")]
        entries.append(("init", stat.S_IFREG | 0o755, INIT.encode()))
        entries.append(("etc/acpi/PWRF/00000080", stat.S_IFREG | 0o755, POWER_BUTTON.encode()))
        entries.append(("bin/busybox", stat.S_IFREG | 0o755, (root / "bin/busybox").read_bytes()))
        entries += [(f"bin/{applet}", stat.S_IFLNK | 0o777, b"busybox") for applet in APPLETS]
        entries += [(f"lib/modules/{Path(m).name}", stat.S_IFREG | 0o644, _module(root, m))
                    for m in MODULES]
        initrd.write_bytes(_newc(entries))
        if not kernel.exists():
            kernel.write_bytes(vmlinuz.read_bytes())
    return kernel, initrd
