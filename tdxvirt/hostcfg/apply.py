"""Carrying out a HostPlan, keeping backups, and undoing a run that fails halfway.

Backups live in the host root's ``/var/lib/tdxvirt/host-setup/``: the first original
of every file setup changed (or the fact that it did not exist), a hash of what setup
wrote, and the commands that take back what setup ran (grubby). A later setup run
never replaces an original, so ``--revert`` returns the host to how it was before the
first run. If any step fails, the files this run already changed are put back and the
manifest is left as it was.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import HostNotReadyError
from ..host.commands import CommandRunner
from ..host.root import HostRoot
from . import files
from .plan import HostPlan, Notice, Step, WriteFile

STATE = "/var/lib/tdxvirt/host-setup"
MANIFEST = f"{STATE}/manifest.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class BackupStore:
    root: HostRoot

    @property
    def base(self) -> Path:
        return self.root.path(STATE)

    def backup_path(self, host_path: str) -> Path:
        return self.base / "files" / host_path.lstrip("/")

    def load(self) -> dict:
        data = files.read_bytes(self.root.path(MANIFEST))
        if data is None:
            return {"version": 1, "files": {}, "undo": []}
        try:
            manifest = json.loads(data)
        except ValueError:
            raise HostNotReadyError(
                f"{MANIFEST} is not valid JSON; tdxvirt cannot tell what it changed "
                f"(backups are in {STATE}/files)") from None
        manifest.setdefault("files", {})
        manifest.setdefault("undo", [])
        return manifest

    def save(self, manifest: dict) -> None:
        self.base.mkdir(parents=True, exist_ok=True, mode=0o700)
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        files.atomic_write(self.root.path(MANIFEST), text.encode(), new_mode=0o600)

    def remember(self, manifest: dict, host_path: str, state: files.FileState | None) -> None:
        """Keep the original of ``host_path`` unless an earlier run already kept one."""
        if host_path in manifest["files"]:
            return
        record: dict = {"existed": state is not None}
        if state is not None:
            backup = self.backup_path(host_path)
            backup.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            files.atomic_write(backup, state.data, new_mode=0o600)
            record.update(mode=state.mode, uid=state.uid, gid=state.gid)
        manifest["files"][host_path] = record

    def original(self, host_path: str, record: dict) -> bytes | None:
        if not record.get("existed"):
            return None
        data = files.read_bytes(self.backup_path(host_path))
        if data is None:
            raise HostNotReadyError(
                f"the backup of {host_path} is missing from {STATE}/files; restore it by hand")
        return data

    def forget(self, manifest: dict, host_path: str) -> None:
        manifest["files"].pop(host_path, None)
        files.remove_file(self.backup_path(host_path))

    def clear_if_empty(self, manifest: dict) -> None:
        if manifest["files"] or manifest["undo"]:
            self.save(manifest)
        else:
            files.remove_file(self.root.path(MANIFEST))


def _current(root: HostRoot, step: WriteFile) -> files.FileState | None:
    state = files.read_state(root.path(step.path))
    if (state.data if state else None) != step.old:
        raise HostNotReadyError(
            f"{step.path} changed while tdxvirt was planning; run the command again")
    return state


def apply_plan(plan: HostPlan, root: HostRoot, runner: CommandRunner,
               echo: Callable[[Step], None], store: BackupStore | None = None,
               reverting: bool = False) -> None:
    """Do every step in order; on a failure, put this run's files back and raise.

    ``store`` keeps backups of what a setup run changes; a revert passes the store it
    restores from with ``reverting=True`` and it forgets each file once restored.
    """
    manifest = store.load() if store else None
    snapshot = json.loads(json.dumps(manifest)) if manifest is not None else None
    undo: list[tuple[WriteFile, files.FileState | None]] = []
    ran: list[str] = []

    def roll_back(reason: str) -> HostNotReadyError:
        restored = []
        for step, state in reversed(undo):
            try:
                if state is None:
                    files.remove_file(root.path(step.path))
                else:
                    files.atomic_write(root.path(step.path), state.data)
                restored.append(step.path)
            except HostNotReadyError as error:
                reason += f"; could not restore {step.path} ({error})"
        if store is not None and snapshot is not None and not reverting:
            for path in set(manifest["files"]) - set(snapshot["files"]):
                files.remove_file(store.backup_path(path))
            store.clear_if_empty(snapshot)
        if restored:
            reason += f"; tdxvirt put back {', '.join(restored)}"
        if ran:
            reason += f" (commands already run: {'; '.join(ran)})"
        return HostNotReadyError(reason)

    for step in plan.steps:
        echo(step)  # shown before it is done
        if isinstance(step, Notice):
            continue
        if isinstance(step, WriteFile):
            try:
                state = _current(root, step)
                if store is not None and manifest is not None and not reverting:
                    # The backup and its record exist before the file changes, so a
                    # run killed right after the write can still be reverted.
                    store.remember(manifest, step.path, state)
                    store.save(manifest)
                if step.new is None:
                    files.remove_file(root.path(step.path))
                else:
                    files.atomic_write(root.path(step.path), step.new, new_mode=step.mode)
            except HostNotReadyError as error:
                raise roll_back(str(error)) from None
            undo.append((step, state))
            if store is not None and manifest is not None and not reverting:
                manifest["files"][step.path]["written_sha256"] = sha256(step.new or b"")
                store.save(manifest)
            continue
        result = runner.run(step.argv)
        if not result.ok:
            raise roll_back(
                f"`{shlex.join(step.argv)}` failed (exit {result.returncode}): "
                f"{result.tail() or 'no output'}")
        ran.append(shlex.join(step.argv))
        if manifest is not None and not reverting and step.undo:
            if list(step.undo) not in manifest["undo"]:
                manifest["undo"].append(list(step.undo))
    if store is not None and manifest is not None:
        if reverting:
            for step, _ in undo:
                store.forget(manifest, step.path)
            manifest["undo"] = []
            store.clear_if_empty(manifest)
        elif manifest != snapshot:
            store.save(manifest)
