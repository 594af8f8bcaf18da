"""This machine's file system as tdxvirt reads it.

Every read of this machine (sysfs, procfs, /etc, /usr/share) goes through a HostRoot,
so tests and the simulated host point it at a fake tree instead of patching module
globals. It describes this machine only: for a URI naming another host nothing is
read through it (tdxvirt.facts chooses; that host's facts come from its libvirt).
"""

from __future__ import annotations

import os
from pathlib import Path


class HostRoot:
    def __init__(self, path: str | os.PathLike = "/"):
        self.base = Path(path)

    def __repr__(self) -> str:
        return f"HostRoot({str(self.base)!r})"

    def path(self, absolute: str) -> Path:
        """Map an absolute host path (``/sys/...``) into this root."""
        return self.base / absolute.lstrip("/")

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
