"""A small real guest that boots from a disk as a TD's guest does, for the simulated host.

The chain is the one a Debian TD boots through on Debian's TDX firmware, which enforces
Secure Boot with Microsoft's keys: OVMF runs Debian's shim (signed by Microsoft) from
the disk's EFI system partition, shim runs Debian's GRUB (signed by Debian), GRUB runs
Debian's kernel (signed by Debian) with an initramfs of Debian's busybox and qemu-ga.
The guest's init loads virtio-net (the kernel's own signed modules), asks the host's
network for an address by DHCP, and runs the guest agent, so `tdxvirt guest verify`
reaches it and the agent reports its address; the agent's shutdown (and ACPI's power
button) powers it off.

Everything comes out of Debian packages, downloaded with this machine's apt and unpacked
with `dpkg-deb -x` (nothing is installed); the disk is a GPT image with one EFI system
partition, written with sfdisk, mkfs.vfat and mtools (no loop device, no mount), then
converted to qcow2. Logging in: a root shell on the serial console (no password: a
throwaway guest for the simulated host), and Debian's dropbear for ssh with the public
keys the image is built with (the initramfs reads no cloud-init seed).
"""

from __future__ import annotations

import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from ..errors import SimulatorError

# A kernel with virtio's PCI transport and console built in (the agent's port is there
# before any module loads): Debian 12's 6.12 LTS image, else the distribution's default.
KERNELS = ("linux-image-6.12-amd64", "linux-image-amd64")
PACKAGES = ("shim-signed", "grub-efi-amd64-signed", "busybox-static", "qemu-guest-agent",
            "dropbear-bin", "libtomcrypt1", "libtommath1")
SHIM = "usr/lib/shim/shimx64.efi.signed"
GRUB = "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"
APPLETS = ("sh", "mount", "mkdir", "cat", "ls", "sleep", "insmod", "ip", "udhcpc", "poweroff",
           "acpid", "echo", "dmesg", "lsmod", "stat", "setsid", "cttyhack", "ps", "uname", "reboot")
# virtio-net and what it needs, in load order, and ACPI's power button (for acpid): the
# kernel package's own signed modules
MODULES = ("kernel/net/core/failover.ko", "kernel/drivers/net/net_failover.ko",
           "kernel/drivers/net/virtio_net.ko", "kernel/drivers/acpi/button.ko",
           "kernel/drivers/input/evdev.ko")
BANNER = "tdxvirt-sim-guest"
# The end of an init: virtio-serial ports appear once QEMU has announced them, so wait
# for the agent's, then become qemu-ga (GUEST: the guest's name in console lines).
AGENT_LOOP = """tries=0
while [ $tries -lt 600 ]; do
  for port in /sys/class/virtio-ports/*; do
    if [ -e "$port/name" ] && [ "$(cat "$port/name")" = org.qemu.guest_agent.0 ]; then
      echo "GUEST: guest agent on /dev/${port##*/}" > /dev/console
      exec qemu-ga -m virtio-serial -p "/dev/${port##*/}"
    fi
  done
  sleep 0.1
  tries=$((tries + 1))
done
echo "GUEST: no guest agent port" > /dev/console
poweroff -f
"""
INIT = f"""#!/bin/sh
export PATH=/bin:/sbin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp /var/run /dev/pts
mount -t devpts devpts /dev/pts
echo "{BANNER}: booted $(cat /proc/version)" > /dev/console
for module in /lib/modules/*.ko; do insmod "$module"; done
acpid -d -c /etc/acpi > /dev/console 2>&1 &  # in the foreground: the daemon mode wants a log directory
ip link set lo up
for nic in /sys/class/net/*; do
  name=${{nic##*/}}
  [ "$name" = lo ] && continue
  ip link set "$name" up
  udhcpc -i "$name" -s /bin/dhcp-event -b -q > /dev/console 2>&1
done
# logging in: a root shell on the serial console (`tdxvirt console`), and ssh with the
# key the image was built with (no passwords: a throwaway guest)
(while true; do setsid cttyhack sh -l; done) &
[ -s /root/.ssh/authorized_keys ] && dropbear -R -s -p 22
""" + AGENT_LOOP.replace("GUEST", BANNER)
DHCP_EVENT = f"""#!/bin/sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${{mask:-24}}" dev "$interface"
    [ -n "$router" ] && ip route add default via "${{router%% *}}" dev "$interface"
    echo "{BANNER}: $interface has $ip" > /dev/console ;;
esac
"""
# ACPI's power button runs acpid's script; qemu-ga's guest-shutdown runs /sbin/shutdown,
# with -r to reboot (libvirt restarts a TD's QEMU either way: a TD cannot reset)
POWER_OFF = "#!/bin/sh\necho 'tdxvirt-sim-guest: powering off' > /dev/console\npoweroff -f\n"
SHUTDOWN = """#!/bin/sh
case " $* " in
  *" -r "*) echo 'tdxvirt-sim-guest: rebooting' > /dev/console; reboot -f ;;
  *) echo 'tdxvirt-sim-guest: powering off' > /dev/console; poweroff -f ;;
esac
"""
GRUB_CFG = """set timeout=0
linux /vmlinuz console=ttyS0 rdinit=/init panic=-1 clearcpuid=mtrr
initrd /initrd.img
boot
"""
ESP_MIB = 120
# mtools refuses a file system whose size is no multiple of its made-up track size
MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
EFI_SYSTEM = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
TOOLS = {"sfdisk": "fdisk", "mkfs.vfat": "dosfstools", "mcopy": "mtools", "mmd": "mtools",
         "qemu-img": "qemu-utils", "dpkg-deb": "dpkg", "apt-get": "apt", "ldd": "libc-bin"}


def newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """An uncompressed cpio archive in the kernel's initramfs format (newc):
    (name, mode, data) each; a symlink's data is its target."""
    out = bytearray()
    for number, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        fields = (number, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        out += b"070701" + b"".join(f"{field:08x}".encode() for field in fields) + encoded
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def _run(argv: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    except FileNotFoundError:
        raise SimulatorError(f"{argv[0]} is not installed (Debian: {TOOLS.get(argv[0], argv[0])}); "
                             "scripts/setup installs it") from None
    if result.returncode != 0:
        tail = " ".join((result.stderr or result.stdout).strip().splitlines()[-2:])
        raise SimulatorError(f"{what} failed ({argv[0]} exit {result.returncode}): {tail}")
    return result


def resolve_kernel(metapackage: str) -> str | None:
    """The real kernel package a metapackage depends on, per this machine's apt lists."""
    result = subprocess.run(["apt-cache", "depends", "--important", metapackage],
                            capture_output=True, text=True, check=False)
    for line in result.stdout.splitlines():
        match = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if match:
            return match.group(1)
    return None


def kernel_package() -> str:
    """The real kernel package behind the first of KERNELS this machine's apt knows."""
    found = next(filter(None, map(resolve_kernel, KERNELS)), None)
    if found is None:
        raise SimulatorError(f"apt knows none of {', '.join(KERNELS)}; run `apt-get update`")
    return found


def _unpack(packages: tuple[str, ...], scratch: Path) -> Path:
    downloads = scratch / "debs"
    downloads.mkdir()
    _run(["apt-get", "download", "-q", *packages], "downloading the guest's Debian packages",
         cwd=downloads)
    root = scratch / "root"
    for deb in sorted(downloads.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(root)], f"unpacking {deb.name}")
    return root


def _module(tree: Path, relative: str) -> bytes:
    """A kernel module, uncompressed (Debian ships .ko or .ko.xz; the signature stays)."""
    plain = tree / relative
    if plain.is_file():
        return plain.read_bytes()
    return lzma.decompress((tree / (relative + ".xz")).read_bytes())


def _libraries(binary: Path, extra: Path) -> list[Path]:
    """What ``binary`` links against (loader included), as ldd resolves it."""
    output = _run(["ldd", str(binary)], f"listing {binary.name}'s libraries",
                  env={**os.environ, "LD_LIBRARY_PATH": str(extra)}).stdout
    if "not found" in output:
        raise SimulatorError(f"{binary.name} needs a library this machine lacks: {output.strip()}")
    return [Path(p) for p in re.findall(r"(?:=>\s*)?(/\S+)\s+\(0x", output)]


def _initramfs(root: Path, scratch: Path, ssh_keys: tuple[str, ...] = ()) -> bytes:
    [tree] = (root / "lib/modules").iterdir()
    entries = [(d, stat.S_IFDIR | 0o755, b"") for d in (
        "bin", "sbin", "dev", "proc", "sys", "run", "tmp", "var", "etc", "etc/acpi",
        "etc/acpi/PWRF", "etc/dropbear", "usr", "usr/sbin", "lib", "lib64", "lib/modules",
        "lib/x86_64-linux-gnu", "usr/lib", "usr/lib/x86_64-linux-gnu")]
    entries += [("root", stat.S_IFDIR | 0o700, b""), ("root/.ssh", stat.S_IFDIR | 0o700, b"")]
    entries.append(("etc/passwd", stat.S_IFREG | 0o644, b"root:x:0:0:root:/root:/bin/sh\n"))
    entries.append(("etc/group", stat.S_IFREG | 0o644, b"root:x:0:\n"))
    if ssh_keys:
        entries.append(("root/.ssh/authorized_keys", stat.S_IFREG | 0o600,
                        "".join(key.strip() + "\n" for key in ssh_keys).encode()))
    entries.append(("init", stat.S_IFREG | 0o755, INIT.encode()))
    entries.append(("bin/dhcp-event", stat.S_IFREG | 0o755, DHCP_EVENT.encode()))
    entries.append(("sbin/shutdown", stat.S_IFREG | 0o755, SHUTDOWN.encode()))
    entries.append(("etc/acpi/PWRF/00000080", stat.S_IFREG | 0o755, POWER_OFF.encode()))
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, (root / "bin/busybox").read_bytes()))
    entries += [(f"bin/{applet}", stat.S_IFLNK | 0o777, b"busybox") for applet in APPLETS]
    # numbered so the shell's glob loads them in dependency order
    entries += [(f"lib/modules/{i}-{Path(m).name}", stat.S_IFREG | 0o644, _module(tree, m))
                for i, m in enumerate(MODULES)]
    libraries: dict[str, Path] = {}
    for program in ("usr/sbin/qemu-ga", "usr/sbin/dropbear"):
        entries.append((program, stat.S_IFREG | 0o755, (root / program).read_bytes()))
        for library in _libraries(root / program, root / "usr/lib/x86_64-linux-gnu"):
            # a library unpacked here is named by its scratch path: put it where the loader looks
            target = f"lib/x86_64-linux-gnu/{library.name}" if str(library).startswith(str(scratch)) \
                else str(library).lstrip("/")
            libraries[target] = library
    entries += [(target, stat.S_IFREG | 0o755, library.read_bytes())
                for target, library in sorted(libraries.items())]
    return newc(entries)


def _esp(root: Path, vmlinuz: Path, initrd: Path, path: Path) -> None:
    """A FAT32 EFI system partition image with the boot chain and the kernel."""
    _run(["mkfs.vfat", "-F", "32", "-n", "TDXGUEST", "-C", str(path), str(ESP_MIB * 1024 - 1024)],
         "making the EFI system partition")
    image = ["-i", str(path)]
    _run(["mmd", *image, "::/EFI", "::/EFI/BOOT", "::/EFI/debian"], "making its directories",
         env=MTOOLS_ENV)
    grub_cfg = path.with_name("grub.cfg")
    grub_cfg.write_text(GRUB_CFG)
    for source, target in ((root / SHIM, "::/EFI/BOOT/BOOTX64.EFI"),
                           (root / GRUB, "::/EFI/BOOT/grubx64.efi"),
                           (grub_cfg, "::/EFI/BOOT/grub.cfg"),
                           (grub_cfg, "::/EFI/debian/grub.cfg"),
                           (vmlinuz, "::/vmlinuz"), (initrd, "::/initrd.img")):
        _run(["mcopy", *image, str(source), target], f"copying {target[3:]}", env=MTOOLS_ENV)


def build_guest_disk(target: Path, ssh_keys: tuple[str, ...] = ()) -> Path:
    """The guest's disk as a qcow2 image at ``target`` (replaced when it exists); root
    logs in with ``ssh_keys`` (public keys' text) over ssh, and on the serial console."""
    for tool in TOOLS:
        if shutil.which(tool) is None:
            raise SimulatorError(f"{tool} is not installed (Debian: {TOOLS[tool]}); scripts/setup "
                                 "installs it")
    with tempfile.TemporaryDirectory(prefix="tdxvirt-guest-") as scratch:
        scratch = Path(scratch)
        root = _unpack((*PACKAGES, kernel_package()), scratch)
        [vmlinuz] = (root / "boot").glob("vmlinuz-*")
        initrd = scratch / "initrd.img"
        initrd.write_bytes(_initramfs(root, scratch, ssh_keys))
        esp = scratch / "esp.img"
        _esp(root, vmlinuz, initrd, esp)
        raw = scratch / "disk.raw"
        with raw.open("wb") as disk:  # 1 MiB for the GPT, the partition, the backup GPT
            disk.truncate((ESP_MIB + 1) * 1024 * 1024)
        _run(["sfdisk", "--quiet", str(raw)], "partitioning the disk",
             input=f"label: gpt\nstart=2048, size={(ESP_MIB - 1) * 2048}, type={EFI_SYSTEM}\n")
        with raw.open("r+b") as disk, esp.open("rb") as partition:
            disk.seek(1024 * 1024)
            shutil.copyfileobj(partition, disk)
        partial = target.with_name(f".{target.name}.partial")
        _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(partial)],
             "converting the disk to qcow2")
        os.replace(partial, target)
    return target
