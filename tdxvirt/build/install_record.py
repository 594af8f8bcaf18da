"""The install record: what ``tdxvirt build install`` wrote, so ``--revert`` removes just that.

One JSON file next to the artifacts record, ``<state dir>/build/installed.json``, per
component: the host root it wrote below, each file written (its path on this machine
-> SHA-256 and size), the folders it created (removed on revert when empty again),
and for OVMF which build each firmware copy was made from (``copies``: the build's
SHA-256 -> the copy's path as libvirt sees it). ``copy_of`` is what the artifacts
record asks, so ``define`` uses the installed copy of the build it would otherwise
take from the build tree.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..paths import state_dir as default_state_dir
from . import jsonrecord

RECORD_NAME = "installed.json"


def record_file(state_dir: str | Path | None = None) -> Path:
    return Path(state_dir if state_dir is not None else default_state_dir()) / "build" / RECORD_NAME


def load(file: str | Path) -> dict:
    """The record ({} when nothing was installed)."""
    return jsonrecord.load(file, "install record", "check the files it named by hand, then delete it")


def save(file: str | Path, data: dict) -> None:
    """Write the record whole (renamed into place: never half written); no record when empty."""
    if not data:
        Path(file).unlink(missing_ok=True)
        return
    jsonrecord.save(file, data)


def copy_of(installed: dict, sha256: str | None) -> str | None:
    """The firmware copy install made of the OVMF build with this SHA-256 into this
    machine's own root, while it is there (a copy below another root is not this host's)."""
    entry = installed.get("ovmf")
    if not sha256 or not isinstance(entry, dict) or entry.get("root") != "/":
        return None
    copies = entry.get("copies")
    path = copies.get(sha256) if isinstance(copies, dict) else None
    return path if isinstance(path, str) and os.path.isfile(path) else None
