"""Where tdxvirt keeps its own state (the simulated host, fetched schemas)."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """``$TDXVIRT_STATE_DIR``, else /var/lib/tdxvirt for root, else XDG state."""
    explicit = os.environ.get("TDXVIRT_STATE_DIR")
    if explicit:
        return Path(explicit)
    if os.geteuid() == 0:
        return Path("/var/lib/tdxvirt")
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(xdg) / "tdxvirt"


def schema_dirs() -> list[Path]:
    """Candidate libvirt RelaxNG schema directories, most specific first."""
    dirs = []
    if os.environ.get("TDXVIRT_SCHEMA_DIR"):
        dirs.append(Path(os.environ["TDXVIRT_SCHEMA_DIR"]))
    dirs.append(state_dir() / "schemas")  # libvirt 12.x schemas fetched by scripts/setup
    dirs.append(Path("/usr/share/libvirt/schemas"))
    return dirs
