"""Bring the simulated host up, report on it, take it down."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..paths import state_dir
from . import SimLayout, chroot, keeper, layout

SCHEMAS = "usr/share/libvirt/schemas"


@dataclass(frozen=True)
class SimStatus:
    installed: bool
    daemon: bool
    keeper_pid: int | None
    host_root: bool
    board: str
    uri: str  # the emulated TDX host's qemu driver: what --sim targets
    test_uri: str  # libvirt 12.x's TDX-aware test driver


def install_schemas(sim: SimLayout) -> None:
    """Copy libvirt 12.x's RelaxNG schemas where tdxvirt.virt.schema looks for them."""
    target = state_dir() / "schemas"
    source = sim.chroot / SCHEMAS
    if (target / "domain.rng").exists() or not source.is_dir():
        return
    staging = target.with_name("schemas.new")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    staging.rename(target)


def ensure_gpu_modes(sim: SimLayout) -> None:
    """The simulated GPUs' modes, kept by the stand-in for NVIDIA's tool (and read by
    the emulated host's libvirt hook, so they exist before its daemon starts): every GPU
    of the board starts with CC and PPCIe off (the real H100 reported CC off, fixture
    nvidia-smi output), a mode set earlier is kept. Written in place: the emulated host
    binds this file (same inode) for its hook's stand-in."""
    from .boards import gpus

    path = Path(sim.gpu_tool_env["STANDIN_STATE"])
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        modes = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        modes = {}
    missing = [a for a in gpus(sim.board) if a not in modes]
    if missing or not path.exists():
        for address in missing:
            modes[address] = {"cc": "off", "ppcie": "off"}
        path.write_text(json.dumps(modes) + "\n")


def _retire_stale(root: Path, sock: Path, uri: str) -> bool:
    """Stop an emulated host whose namespaces bind another tdxvirt's code for its hook
    (tdxhost.hook_code_is_current), or that runs a QEMU installed since without the
    wrapper (tdxhost.emulators_are_wrapped), guests first, so it starts again as it
    should."""
    from . import tdxhost

    if tdxhost.hook_code_is_current(root) and tdxhost.emulators_are_wrapped(root):
        return False
    stop_guests(uri, sock)
    chroot.stop_daemons(root)
    return True


def _change_board(sim: SimLayout, board: str) -> bool:
    """Give the emulated TDX host ``board``'s devices: as replacing a server's GPUs, its
    guests are stopped and it starts anew (new namespaces over the new device tree).
    True when the board changed."""
    from .boards import BOARDS

    if board not in BOARDS:
        from ..errors import InputError

        raise InputError(f"unknown board {board!r}; the simulated host has "
                         + ", ".join(BOARDS))
    if board == sim.board:
        return False
    stop_guests(sim.qemu_uri, sim.socket)
    chroot.stop_daemons(sim.chroot)
    sim.board_file.write_text(board + "\n")
    return True


def up(sim: SimLayout | None = None, board: str | None = None) -> list[str]:
    """Start whatever is not running (or runs another tdxvirt's hook code); return what
    was started. ``board``: the emulated TDX host's board (boards.py), kept for later
    starts; a host running with another board starts anew."""
    sim = sim or layout()
    if board is not None:
        _change_board(sim, board)
    ensure_gpu_modes(sim)
    started = []
    _retire_stale(sim.chroot, sim.socket, sim.qemu_uri)
    if chroot.is_provisioned(sim.legacy_chroot):
        _retire_stale(sim.legacy_chroot, sim.legacy_socket, sim.legacy_qemu_uri)
    if chroot.start_daemons(sim.chroot, sim.socket, sim.devices, board=sim.board):
        started.append(f"emulated TDX host (libvirt 12.x, board {sim.board})")
    start_autostart_networks(sim)
    if chroot.is_provisioned(sim.legacy_chroot) and chroot.start_daemons(
            sim.legacy_chroot, sim.legacy_socket, sim.legacy_devices):
        started.append("libvirt 11.x host")
    install_schemas(sim)
    shutil.rmtree(sim.base / "hostroot", ignore_errors=True)  # before one host: a copy
    if keeper.start(sim.test_uri, sim.keeper_pidfile, sim.keeper_log):
        started.append("test-driver keeper")
    return started


# libvirt autostarts domains once per host boot, marking it here (in /run, which a boot
# empties); removing the mark makes the next daemon start behave as the first after a boot.
AUTOSTARTED = "run/libvirt/qemu/autostarted"


def exec_argv(command: list[str], sim: SimLayout | None = None) -> list[str]:
    """``command`` run in the emulated TDX host's network namespace (that of its virtlogd,
    which lives as long as the namespaces do); the mount namespace stays this machine's."""
    from ..errors import SimulatorError

    sim = sim or layout()
    pid = chroot.alive_pid(sim.chroot / "run" / "virtlogd.pid")
    if pid is None:
        raise SimulatorError("the emulated TDX host is not running; start it with `tdxvirt sim up`")
    return ["nsenter", f"--target={pid}", "--net", "--", *command]


def restart(sim: SimLayout | None = None, boot: bool = False) -> None:
    """Restart the emulated TDX host's libvirtd, as `systemctl restart libvirtd` does on
    a real host: it rereads qemu.conf and finds its hooks again; running domains keep
    running (the new daemon reconnects to them), virtlogd and the namespaces stay. The
    test driver lives in the same daemon: its domains are forgotten, as by `sim down`,
    and its keeper starts again on the new daemon. ``boot``: as the first start after a
    host boot, when libvirt autostarts the domains marked for it."""
    sim = sim or layout()
    keeper.stop(sim.keeper_pidfile)
    # a host binding another tdxvirt's hook code starts anew (its namespaces go with it)
    if not _retire_stale(sim.chroot, sim.socket, sim.qemu_uri):
        chroot.stop_daemons(sim.chroot, names=("libvirtd",))
    if boot:
        (sim.chroot / AUTOSTARTED).unlink(missing_ok=True)
    chroot.start_daemons(sim.chroot, sim.socket, sim.devices, board=sim.board)
    keeper.start(sim.test_uri, sim.keeper_pidfile, sim.keeper_log)


def down(sim: SimLayout | None = None) -> list[str]:
    """Stop the keeper (the test driver's domains are then forgotten) and the daemons,
    and unmount the roots' /proc, /sys, /dev and /run, so the state directory can be
    deleted without reaching through a bind mount."""
    sim = sim or layout()
    stopped = ["test-driver keeper"] if keeper.stop(sim.keeper_pidfile) else []
    for root, sock, uri in ((sim.chroot, sim.socket, sim.qemu_uri),
                            (sim.legacy_chroot, sim.legacy_socket, sim.legacy_qemu_uri)):
        # a daemon that stops leaves its QEMUs running, and a later `sim up` would start
        # a second QEMU for the same TD: the guests go first
        stopped += [f"domain {name}" for name in stop_guests(uri, sock)]
        stopped += chroot.stop_daemons(root)
        chroot.unmount(root)
    return stopped


def start_autostart_networks(sim: SimLayout) -> None:
    """Every network marked to autostart is active once the emulated host is up, as after
    a real host's boot: its TDs' NICs depend on it, and a daemon that skipped the
    autostart (its once-per-boot mark outlived the bridge) would otherwise fail every
    start with "network 'default' is not active". One that cannot start stops `sim up`
    with libvirt's reason, rather than thirty TDs failing later."""
    from ..errors import SimulatorError
    from ..virt.conn import libvirt_error_type, open_connection

    conn = open_connection(sim.qemu_uri)
    try:
        for network in conn.listAllNetworks():
            if network.autostart() and not network.isActive():
                try:
                    network.create()
                except libvirt_error_type() as error:
                    raise SimulatorError(
                        f"the emulated TDX host's network {network.name()!r} does not start: "
                        f"{error.get_error_message()} (its daemon's log: "
                        f"{sim.chroot / 'var/log/libvirt/libvirtd.log'})") from None
    finally:
        conn.close()


def stop_guests(uri: str, sock: Path) -> list[str]:
    """Power off every running domain of a simulated daemon that answers; their names."""
    if not chroot.socket_answers(sock):
        return []
    from ..errors import TdxvirtError
    from ..virt.conn import libvirt_error_type, open_connection

    try:
        conn = open_connection(uri)
    except TdxvirtError:
        return []
    stopped = []
    try:
        for domain in conn.listAllDomains(1):  # VIR_CONNECT_LIST_DOMAINS_ACTIVE
            try:
                domain.destroy()
                stopped.append(domain.name())
            except libvirt_error_type():
                pass  # it stopped by itself meanwhile
    finally:
        conn.close()
    return stopped


def status(sim: SimLayout | None = None) -> SimStatus:
    sim = sim or layout()
    return SimStatus(
        installed=chroot.is_provisioned(sim.chroot),
        daemon=chroot.socket_answers(sim.socket),
        keeper_pid=keeper.running_pid(sim.keeper_pidfile),
        host_root=(sim.devices / "sys").is_dir(),
        board=sim.board,
        uri=sim.uri,
        test_uri=sim.test_uri,
    )


def provision(sim: SimLayout | None = None, log=print, board: str | None = None) -> list[str]:
    """Install the simulated host if needed, then bring it up (scripts/setup)."""
    sim = sim or layout()
    chroot.provision(sim.chroot, chroot.FORKY, log=log)
    chroot.provision(sim.legacy_chroot, chroot.TRIXIE, log=log)
    return up(sim, board=board)
