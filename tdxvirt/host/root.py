"""This machine's file system as tdxvirt reads it.

Every read of this machine (sysfs, procfs, /etc, /usr/share) goes through a HostRoot,
so tests and the simulated host point it at a fake tree instead of patching module
globals. It describes this machine only: for a URI naming another host nothing is
read through it (tdxvirt.facts chooses; that host's facts come from its libvirt).

A root may be put together from several trees (``mounts``), as a mount namespace is:
the simulated host is its daemon's Debian root with the simulated device tree's
``/sys``, ``/dev`` and ``/proc`` files over it (tdxvirt.sim.onehost), so what tdxvirt
reads and what that host's libvirt uses are the same files. Such a whole host also
says how its programs run, where its processes are and how its libvirt restarts;
a plain tree of files (``--host-root``, test fixtures) says none of it.
"""

from __future__ import annotations

import os
from pathlib import Path


class HostRoot:
    # What only a whole host (not a tree of files) can say; subclasses set them.
    files_in_root = False  # the user's files (disks) are inside it, not this machine's
    process_root: str | None = None  # its processes: this machine's whose root is this
    daemon_restart: tuple[str, ...] | None = None  # restarts its libvirt without systemd
    hook_install: dict | None = None  # tdxvirt's hook as installed there (enforce.script)

    def __init__(self, path: str | os.PathLike = "/",
                 mounts: dict[str, str | os.PathLike] | None = None):
        self.base = Path(path)
        # longest first, so /proc/cmdline wins over /proc
        self.mounts = sorted(((m.rstrip("/"), Path(t)) for m, t in (mounts or {}).items()),
                             key=lambda item: -len(item[0]))

    def __repr__(self) -> str:
        return f"HostRoot({str(self.base)!r})"

    def path(self, absolute: str) -> Path:
        """Map an absolute host path (``/sys/...``) into this root."""
        for mount, target in self.mounts:
            if absolute == mount or absolute.startswith(mount + "/"):
                return target / absolute[len(mount):].lstrip("/")
        return self.base / absolute.lstrip("/")

    def runner(self):
        """How programs run on this host (tdxvirt.host.commands.CommandRunner); None:
        this machine's for ``/``, none below any other root."""
        return None

    def exists(self, absolute: str) -> bool:
        return self.path(absolute).exists()

    def read_text(self, absolute: str) -> str:
        return self.path(absolute).read_text()

    def read_value(self, absolute: str) -> str | None:
        """A one-line sysfs value, stripped; None when the file is absent."""
        try:
            return self.read_text(absolute).strip()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def link_name(self, absolute: str) -> str | None:
        """The last component of a symlink's target (a driver or group name)."""
        try:
            return os.path.basename(os.readlink(self.path(absolute)))
        except (FileNotFoundError, NotADirectoryError, OSError):
            return None

    def listdir(self, absolute: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(absolute)))
        except (FileNotFoundError, NotADirectoryError):
            return []
