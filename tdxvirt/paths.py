"""Where tdxvirt keeps its own state (the simulated host, fetched schemas).

As root, ``$TDXVIRT_STATE_DIR`` and ``$TDXVIRT_SCHEMA_DIR`` (kept by ``sudo -E``) are
used only when root owns them and no group or other user can change them or a
directory above them: root writes locks and builds to the state directory, and the
schema decides which domain XML passes as valid.
"""

from __future__ import annotations

import os
from pathlib import Path

from .host.trust import require_trusted


def state_dir() -> Path:
    """``$TDXVIRT_STATE_DIR``, else /var/lib/tdxvirt for root, else XDG state."""
    explicit = os.environ.get("TDXVIRT_STATE_DIR")
    if explicit:
        # Missing is fine (tdxvirt creates it), if nobody else can create it first.
        require_trusted(explicit, "TDXVIRT_STATE_DIR", missing_ok=True,
                        otherwise="unset TDXVIRT_STATE_DIR")
        return Path(explicit)
    if os.geteuid() == 0:
        return Path("/var/lib/tdxvirt")
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(xdg) / "tdxvirt"


def schema_dirs() -> list[Path]:
    """Candidate libvirt RelaxNG schema directories, most specific first."""
    dirs = []
    if os.environ.get("TDXVIRT_SCHEMA_DIR"):
        explicit = Path(os.environ["TDXVIRT_SCHEMA_DIR"])
        require_schema_dir(explicit)
        dirs.append(explicit)
    dirs.append(state_dir() / "schemas")  # libvirt 12.x schemas fetched by scripts/setup
    dirs.append(Path("/usr/share/libvirt/schemas"))
    return dirs


def require_schema_dir(directory: Path) -> None:
    """As root: the directory and every schema in it only root can change (a missing
    directory is left to the search, which skips it)."""
    if not directory.is_dir():
        return
    require_trusted(directory, "TDXVIRT_SCHEMA_DIR", otherwise="unset TDXVIRT_SCHEMA_DIR")
    for schema in sorted(directory.glob("*.rng")):
        require_trusted(schema, "TDXVIRT_SCHEMA_DIR schema", otherwise="unset TDXVIRT_SCHEMA_DIR")
