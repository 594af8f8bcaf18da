"""Which libvirt daemon serves QEMU on this host, and how to make it reread qemu.conf.

A running ``virtqemud`` (modular daemons) or ``libvirtd`` (monolithic) is the one in
use; when neither runs, the enabled systemd units say which would start. Restarting
goes through systemd when systemd runs the host (or the way a host root names, as the
simulated host does: ``tdxvirt sim restart``); otherwise tdxvirt says what to restart
rather than killing daemons it did not start.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..host.procs import Process, find_processes
from ..host.root import HostRoot

DAEMONS = ("virtqemud", "libvirtd")
_WANTS = ("sockets.target.wants/{}.socket", "multi-user.target.wants/{}.service")
_BINARIES = ("/usr/sbin/{}", "/usr/bin/{}", "/sbin/{}")


@dataclass(frozen=True)
class DaemonInUse:
    name: str | None  # virtqemud, libvirtd, or None (no libvirt daemon installed)
    processes: tuple[Process, ...]
    systemd: bool
    restart: tuple[str, ...] | None = None  # the host's own restart (HostRoot.daemon_restart)

    @property
    def running(self) -> bool:
        return bool(self.processes)

    @property
    def started_at(self) -> float | None:
        times = [p.started_at for p in self.processes if p.started_at is not None]
        return min(times) if times else None


def _enabled(root: HostRoot, name: str) -> bool:
    return any(root.exists(f"/etc/systemd/system/{w.format(name)}") for w in _WANTS)


def _installed(root: HostRoot, name: str) -> bool:
    return any(root.exists(b.format(name)) for b in _BINARIES)


def detect(root: HostRoot) -> DaemonInUse:
    processes = find_processes(root, DAEMONS)
    systemd = root.exists("/run/systemd/system")  # what sd_booted() checks
    for name in DAEMONS:
        running = tuple(p for p in processes if p.name == name)
        if running:
            return DaemonInUse(name, running, systemd, root.daemon_restart)
    for name in DAEMONS:
        if _enabled(root, name):
            return DaemonInUse(name, (), systemd)
    for name in ("libvirtd", "virtqemud"):
        if _installed(root, name):
            return DaemonInUse(name, (), systemd)
    return DaemonInUse(None, (), systemd)


def restart_argv(daemon: DaemonInUse) -> tuple[str, ...] | None:
    """systemctl's restart of the daemon in use, None when it cannot be done that way."""
    if daemon.name and daemon.running and daemon.systemd:
        return ("systemctl", "restart", f"{daemon.name}.service")
    if daemon.running and daemon.restart:
        return daemon.restart
    return None


def restart_advice(daemon: DaemonInUse) -> str:
    """What to tell the user when tdxvirt does not restart the daemon itself."""
    if daemon.name is None:
        return ("no libvirt daemon (libvirtd or virtqemud) is installed; it will read "
                "qemu.conf when installed and started")
    if not daemon.running:
        return f"{daemon.name} is not running; it reads the new qemu.conf when it starts"
    pids = ", ".join(str(p.pid) for p in daemon.processes)
    return (f"restart {daemon.name} (pid {pids}) so it rereads qemu.conf: this host has no "
            f"systemd, so tdxvirt does not restart it itself (e.g. `service {daemon.name} "
            f"restart`, or stop it and start `{daemon.name} -d` again)")
