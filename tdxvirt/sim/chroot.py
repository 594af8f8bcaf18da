"""Debian roots whose libvirt daemons serve the simulated host, reached by socket.

- forky: libvirt 12.x (TDX-aware test driver, qemu driver with QEMU 11.x). libvirt
  12.x cannot be installed on Debian 12 (it needs a newer glibc), hence a chroot.
- trixie: libvirt 11.x, which rejects TDX XML: the "libvirt without TDX" that the
  qemu-args dialect and the dialect checks are tested against, on Debian 12 and 13.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import SimulatorError
from .mirror import debian_mirror

# The forky index is frozen past its Valid-Until date.
APT_OPTIONS = ["-o", "Acquire::Check-Valid-Until=false"]


@dataclass(frozen=True)
class Distribution:
    suite: str
    packages: tuple[str, ...]
    what: str


# python3-minimal: the emulated TDX host's QEMU wrapper (tdxhost.py) runs under it;
# python3-lxml: tdxvirt's libvirt hook (tdxvirt.enforce) runs under the root's Python;
# qemu-utils: qemu-img, which libvirt's storage driver runs to create a volume (as
# virt-manager's Add Disk asks it to).
# The storage and node-device drivers: what a real host's libvirt has, and what
# virt-xml/virt-install need to add a disk by path on a connection they call remote.
# The network driver with its 'default' network (dnsmasq, nftables) and passt: a TD's
# NIC as a real host gives it (--network default / user), in the host's own network
# namespace.
FORKY = Distribution("forky", ("libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-clients",
                               "libvirt-daemon-driver-storage", "libvirt-daemon-driver-nodedev",
                               "libvirt-daemon-driver-network", "libvirt-daemon-config-network",
                               "dnsmasq-base", "nftables", "passt", "iproute2",
                               "qemu-system-x86", "qemu-utils", "ovmf-generic", "ovmf-inteltdx",
                               "python3-minimal", "python3-lxml"),
                     "libvirt 12.x, QEMU and OVMF")
TRIXIE = Distribution("trixie", ("libvirt-daemon", "libvirt-daemon-driver-qemu",
                                 "qemu-system-x86", "python3-minimal", "python3-lxml"),
                 "libvirt 11.x and QEMU (no TDX XML)")
# Without this every domain start fails: "Failed disable mount propagation out of the
# root filesystem: Invalid argument" (no private mount namespace in a chroot here).
QEMU_CONF_LINE = "namespaces = [ ]\n"
DAEMONS = ("virtlogd", "libvirtd")
# with the board's NVLink fabric daemons (stand-ins, fabric.py), started before them
ALL_DAEMONS = ("nv-fabricmanager", "nvlsm", *DAEMONS)
# libvirt's network driver autostarts networks once per host boot, marking it here.
NETWORK_AUTOSTARTED = "run/libvirt/network/autostarted"


def run(argv: list[str], what: str, **kwargs) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        tail = " ".join((result.stderr or result.stdout).strip().splitlines()[-2:])
        raise SimulatorError(f"{what} failed ({argv[0]} exit {result.returncode}): {tail}")


def _marker(distribution: Distribution) -> str:
    return " ".join(distribution.packages) + "\n"


def is_provisioned(root: Path, distribution: Distribution | None = None) -> bool:
    """Installed (with this distribution's current package set, when one is named)."""
    marker = root / ".tdxvirt-provisioned"
    if not (root / "usr/sbin/libvirtd").exists() or not marker.exists():
        return False
    return distribution is None or marker.read_text() == _marker(distribution)


def provision(root: Path, distribution: Distribution = FORKY, log=print) -> None:
    """debootstrap the distribution and install its libvirt and QEMU (idempotent)."""
    if is_provisioned(root, distribution):
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    if not (root / "usr/bin/apt-get").exists():
        log(f"creating a Debian {distribution.suite} root at {root} (about 30 s)")
        # debootstrap's sid script serves every suite newer than the host's.
        run(["debootstrap", "--variant=minbase", distribution.suite, str(root), debian_mirror(),
              "/usr/share/debootstrap/scripts/sid"], "debootstrap")
    mount(root)
    log(f"installing {distribution.what} into it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["chroot", str(root), "apt-get", *APT_OPTIONS, "update", "-qq"], "apt-get update")
    run(["chroot", str(root), "apt-get", *APT_OPTIONS, "install", "-y", "-qq",
          "--no-install-recommends", *distribution.packages], "apt-get install", env=env)
    qemu_conf = root / "etc/libvirt/qemu.conf"
    if QEMU_CONF_LINE not in qemu_conf.read_text():
        with qemu_conf.open("a") as conf:
            conf.write(QEMU_CONF_LINE)
    if "libvirt-daemon-config-network" in distribution.packages:
        _default_network(root)
    (root / ".tdxvirt-provisioned").write_text(_marker(distribution))


def _default_network(root: Path) -> None:
    """libvirt's 'default' network as Debian defines it (virbr0, 192.168.122.0/24 with
    DHCP), started with the daemon as on a real host, but forwarding in mode 'open':
    NAT's rules need tc's csum action, which this machine kind's kernel lacks ("Failed
    to load TC action module"), and the emulated host's network namespace has no
    uplink to translate to anyway. Written before the daemon first starts, as the
    package's own postinst writes it."""
    from importlib import resources

    networks = root / "etc/libvirt/qemu/networks"
    (networks / "autostart").mkdir(parents=True, exist_ok=True)
    (networks / "default.xml").write_text(
        resources.files("tdxvirt.sim").joinpath("default-network.xml").read_text())
    os.chmod(networks / "default.xml", 0o600)
    link = networks / "autostart/default.xml"
    if not link.is_symlink():
        link.symlink_to("/etc/libvirt/qemu/networks/default.xml")


def _mounted(path: Path) -> bool:
    return os.path.ismount(path)


# A private /dev of the few nodes libvirtd and QEMU use. Not the host's /dev: that
# keeps this machine's devices out of the daemon's reach, and hides /dev/kvm, which
# on this machine kind half-works (QEMU's probe sees KVM, libvirt's later check does
# not), making libvirt re-probe QEMU on every connection (3-60 s each).
_DEV_NODES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8),
              "urandom": (1, 9), "tty": (5, 0)}


def populate_dev(dev: Path) -> None:
    for name, (major, minor) in _DEV_NODES.items():
        os.mknod(dev / name, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(dev / name, 0o666)
    (dev / "pts").mkdir()
    run(["mount", "-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=620", "devpts",
          str(dev / "pts")], "mounting devpts")
    os.symlink("pts/ptmx", dev / "ptmx")
    (dev / "shm").mkdir()
    run(["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", str(dev / "shm")], "mounting /dev/shm")
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{fd}", dev / name)
    os.symlink("/proc/self/fd", dev / "fd")


def mount(root: Path) -> None:
    """proc, /sys (rslave, so nothing propagates back), a private /dev, a tmpfs /run."""
    dev = root / "dev"
    if _mounted(dev) and (dev / "kvm").exists():  # an older layout bound the host's /dev
        run(["umount", "-R", str(dev)], f"unmounting {dev}")
    if not _mounted(root / "proc"):
        run(["mount", "-t", "proc", "proc", str(root / "proc")], "mounting proc")
    if not _mounted(root / "sys"):
        run(["mount", "--rbind", "/sys", str(root / "sys")], "binding /sys")
        run(["mount", "--make-rslave", str(root / "sys")], "making /sys rslave")
    if not _mounted(dev):
        dev.mkdir(exist_ok=True)
        run(["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", str(dev)], "mounting /dev")
        populate_dev(dev)
    if not _mounted(root / "run"):
        (root / "run").mkdir(exist_ok=True)
        run(["mount", "-t", "tmpfs", "tmpfs", str(root / "run")], "mounting /run")


def unmount(root: Path) -> None:
    for name in ("run", "dev", "sys", "proc"):
        if _mounted(root / name):
            run(["umount", "-R", str(root / name)], f"unmounting {root / name}")


def socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(path))
            return True
        except OSError:
            return False


def start_daemons(root: Path, sock: Path, devices: Path, wait: float = 120.0,
                  board: str | None = None) -> bool:
    """Start virtlogd and libvirtd in the root, in the emulated host's own mount and
    network namespace (tdxhost.py) with ``devices`` as its device tree (``board``'s
    devices, boards.py, when it is built anew); False when they
    already ran. The wait covers libvirt probing QEMU afresh (each namespace has a new
    /dev/kvm, whose ctime is part of libvirt's capability cache key)."""
    if socket_answers(sock):
        return False
    if not is_provisioned(root):
        raise SimulatorError(
            f"the simulated host is not installed at {root}; run scripts/setup first"
        )
    if os.geteuid() != 0:
        raise SimulatorError("starting the simulated host's libvirt daemon needs root")
    mount(root)
    from . import tdxhost

    tdxhost.install(root)
    if board is not None:  # the emulated TDX host: its board's fabric daemons or none
        from .boards import BOARDS
        from .fabric import install as install_fabric

        install_fabric(root, BOARDS[board].fabric_manager)
    survivor = alive_pid(root / "run" / "virtlogd.pid")
    if survivor is not None:
        # libvirtd died and virtlogd did not: the emulated host's namespaces live on in
        # it, and its socket is live, not stale. libvirtd starts again in there.
        for stale in (root / "run" / "libvirt").glob("libvirt*-sock*"):
            stale.unlink()
        run(tdxhost.rejoin_argv(survivor, root), f"starting libvirtd again in {root}")
    else:
        for stale in (root / "run" / "libvirt").glob("*-sock"):  # left by killed daemons
            stale.unlink()
        # New namespaces are a boot of the emulated host's network: its bridge is gone,
        # so libvirt must autostart the 'default' network again, which it does only
        # without the once-per-boot mark a boot's empty /run would not have.
        (root / NETWORK_AUTOSTARTED).unlink(missing_ok=True)
        tdxhost.build_devices(devices, root, board)
        run(tdxhost.unshare_argv(root, devices), f"starting the emulated TDX host in {root}")
    deadline = time.monotonic() + wait
    while not socket_answers(sock):
        if time.monotonic() > deadline:
            raise SimulatorError(f"libvirtd in {root} did not open {sock} within {wait:.0f} s")
        time.sleep(0.1)
    return True


def alive_pid(pidfile: Path) -> int | None:
    """The pid a daemon wrote, when that process still runs."""
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def stop_daemons(root: Path, wait: float = 10.0, names: tuple[str, ...] = ALL_DAEMONS) -> list[str]:
    """Stop the daemons started in this root (``names`` of them), by the pid files they
    wrote, and wait for them to go (a start right after must not find a dying daemon's
    socket)."""
    stopped, pids = [], []
    for daemon in reversed(names):
        pidfile = root / "run" / f"{daemon}.pid"
        try:
            pid = int(pidfile.read_text().strip())
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            continue
        stopped.append(daemon)
        pids.append(pid)
    deadline = time.monotonic() + wait
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
    return stopped
