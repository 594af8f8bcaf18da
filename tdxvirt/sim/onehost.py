"""The simulated host as one host: the root tdxvirt reads is the root its libvirt runs in.

libvirtd runs in the forky root, in a mount namespace where the simulated device
tree's ``/sys`` parts and stand-in ``/dev`` nodes are bound over that root
(tdxhost.enter). ``SimHostRoot`` puts the same files together for tdxvirt: the forky
root for ``/`` (its emulator, firmware, qemu.conf, boot settings, hook, disks), the
device tree for ``/sys``, ``/dev`` and ``/proc``'s files (the CPU and the command line
it booted with). So `host check` reads the qemu.conf that daemon reads, runs the QEMU
it runs (chrooted: outside the namespace the emulator is the real binary), finds the
daemon's processes (this machine's processes whose root is that root), and `host
setup` edits those files and restarts that daemon (`tdxvirt sim restart`).

The user's files are that host's too: the directories where users keep disk images and
keys, and where tdxvirt creates overlays and seeds (``shared_dirs``), are this machine's,
bound at the same paths into the daemon's root. So `define --image /tmp/base.qcow2`
names one file for the user, tdxvirt and that libvirt, as on one host; a file anywhere
else is not on the simulated host, and tdxvirt says so.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..host.commands import CommandResult, SubprocessRunner
from ..host.root import HostRoot
from . import SimLayout, layout

# How the simulated host's libvirt restarts (it has no systemd): shown in plans as the
# command a user would type, run by SimRunner on this machine.
RESTART = ("tdxvirt", "sim", "restart")


# Where users keep disk images and keys (and libvirt's own images directory); with the
# directory tdxvirt creates overlays and seeds in, see shared_dirs.
USER_DIRS = ("/tmp", "/root", "/home", "/srv", "/var/lib/libvirt/images")


def shared_dirs(create: bool = False) -> tuple[str, ...]:
    """This machine's directories the simulated host shares, at the same paths: those of
    USER_DIRS that exist here, and tdxvirt's storage directory (storage_paths.storage_dir:
    libvirt's images directory when this machine has one, else the state directory's
    images/, created with ``create`` as define would create it)."""
    import os

    from ..config import Config
    from ..domain.storage_paths import storage_dir

    storage = storage_dir(Config())
    if create:
        os.makedirs(storage, mode=0o711, exist_ok=True)
    found = [d for d in USER_DIRS if os.path.isdir(d)]
    return tuple(found + [storage] if storage not in found and os.path.isdir(storage) else found)


class SimHostRoot(HostRoot):
    files_in_root = True
    daemon_restart = RESTART

    def __init__(self, sim: SimLayout | None = None):
        from .tdxhost import hook_install

        self.sim = sim or layout()
        tree = self.sim.devices
        self.shared = shared_dirs()
        super().__init__(self.sim.chroot, mounts={"/sys": tree / "sys", "/dev": tree / "dev",
                                                  "/proc": tree / "proc",
                                                  **{d: d for d in self.shared}})
        self.process_root = str(self.sim.chroot)
        self.hook_install = hook_install()

    def __repr__(self) -> str:
        return f"SimHostRoot({str(self.base)!r})"

    def runner(self):
        return SimRunner(self)


class SimRunner(SubprocessRunner):
    """The simulated host's programs, run inside its root (as root: a root-owned tree,
    checked like any other, see SubprocessRunner); its libvirt's restart, on this
    machine (control.restart)."""

    def check(self, argv: Sequence[str]) -> None:
        if tuple(argv) != RESTART:
            super().check(argv)

    def run(self, argv: Sequence[str], timeout: float = 60) -> CommandResult:
        if tuple(argv) != RESTART:
            return super().run(argv, timeout)
        from ..errors import SimulatorError
        from . import control

        try:
            control.restart(self.root.sim)
        except SimulatorError as error:
            return CommandResult(tuple(argv), 1, "", str(error))
        return CommandResult(tuple(argv), 0)
