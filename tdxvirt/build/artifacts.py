"""The artifacts record: what each build produced, and from which sources.

One JSON file, ``<state dir>/build/artifacts.json`` (the same whatever ``--workdir``
a build used, so ``define`` finds the latest build without being told), holding per
component the paths it produced (bzImage, modules dir, qemu-system-x86_64, OVMF.fd)
with each file's SHA-256 and size (``digests``), and its provenance (URL, ref, fetched
and patched revisions, patch sets). ``check_record()`` compares the files with them.

``recorded()`` is what ``define`` asks: the QEMU and OVMF to use, when they exist. For
OVMF that is the copy ``build install`` made of this very build (``install_record``),
when there is one: a rebuild cannot change it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..paths import state_dir as default_state_dir
from . import digests, install_record, jsonrecord

RECORD_NAME = "artifacts.json"
# the artifact ``define`` uses for each component, in order of preference
PRIMARY = {"qemu": ("installed", "qemu-system-x86_64"), "ovmf": ("OVMF.fd",),
           "kernel": ("vmlinuz", "bzImage")}


def record_file(state_dir: str | Path | None = None) -> Path:
    return Path(state_dir if state_dir is not None else default_state_dir()) / "build" / RECORD_NAME


def load(file: str | Path) -> dict:
    """The record ({} when nothing was built yet)."""
    return jsonrecord.load(file, "artifacts record", "delete it and run `tdxvirt build run` again")


def update(file: str | Path, component: str, entry: dict) -> bool:
    """Set one component's entry; False (and nothing written) when it is unchanged."""
    data = load(file)
    old = dict(data.get(component, {}))
    old.pop("recorded_at", None)
    if old == entry:
        return False
    data[component] = {**entry, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    jsonrecord.save(file, data)
    return True


@dataclass(frozen=True)
class RecordedBuild:
    """One component's build, as ``define`` and ``show`` use it."""

    component: str
    path: str  # the artifact to use (installed QEMU before the build tree's)
    ref: str
    revision: str | None  # the fetched commit
    patched_revision: str | None
    patches: tuple[str, ...]
    recorded_at: str | None

    def describe(self) -> str:
        """``qemu v9.1.0-rc0 (1a2b3c4d5e6f) + tdx_qemu_baseline_x.mbox, built 2025-...``"""
        text = f"{self.component} {self.ref}"
        if self.revision:
            text += f" ({self.revision[:12]})"
        if self.patches:
            text += " + " + ", ".join(self.patches)
        if self.recorded_at:
            text += f", built {self.recorded_at}"
        return text


def builds(record: dict, installed: dict | None = None) -> dict[str, RecordedBuild]:
    """Every component of a record whose primary artifact still exists; with the
    ``installed`` record, OVMF's is the installed copy of that build when there is one."""
    found = {}
    for component, keys in PRIMARY.items():
        entry = record.get(component)
        if not isinstance(entry, dict):
            continue
        paths = entry.get("artifacts", {})
        path = next((paths[k] for k in keys if isinstance(paths.get(k), str) and os.path.exists(paths[k])), None)
        if path is None:
            continue
        if component == "ovmf" and installed:
            recorded_digest = (entry.get("digests") or {}).get("OVMF.fd")
            sha256 = recorded_digest.get("sha256") if isinstance(recorded_digest, dict) else None
            path = install_record.copy_of(installed, sha256) or path
        found[component] = RecordedBuild(
            component=component, path=path, ref=str(entry.get("ref", "?")),
            revision=entry.get("revision"), patched_revision=entry.get("patched_revision"),
            patches=tuple(entry.get("patches", ())), recorded_at=entry.get("recorded_at"),
        )
    return found


def check_record(record: dict) -> dict[str, dict[str, digests.Check]]:
    """Per component and artifact: does the file still match its recorded digest?"""
    found: dict[str, dict[str, digests.Check]] = {}
    for component, entry in record.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("artifacts"), dict):
            continue
        recorded_digests = entry.get("digests") if isinstance(entry.get("digests"), dict) else {}
        found[component] = {name: digests.check(path, recorded_digests.get(name))
                            for name, path in entry["artifacts"].items() if isinstance(path, str)}
    return found


def recorded(state_dir: str | Path | None = None) -> dict[str, RecordedBuild]:
    """The recorded builds ``define`` may use: keys "qemu" (the emulator), "ovmf"
    (the loader) and "kernel", each present only when its file exists."""
    return builds(load(record_file(state_dir)), install_record.load(install_record.record_file(state_dir)))


def build_of(path: str, state_dir: str | Path | None = None) -> RecordedBuild | None:
    """The recorded build that produced ``path`` (for ``show``: which build a TD uses);
    an installed firmware copy counts as its build's."""
    record = load(record_file(state_dir))
    found = builds(record, install_record.load(install_record.record_file(state_dir)))
    for component, entry in record.items():
        if component in found and isinstance(entry, dict):
            paths = [*entry.get("artifacts", {}).values(), found[component].path]
            if os.path.realpath(path) in {os.path.realpath(p) for p in paths}:
                return found[component]
    return None
