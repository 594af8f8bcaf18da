"""Carrying out a HostPlan, keeping backups, and undoing a run that fails halfway.

Backups live in the host root's ``/var/lib/tdxvirt/host-setup/``: the first original
of every file setup changed (or the fact that it did not exist), a hash of what setup
wrote, and the commands that take back what setup ran (grubby). A later setup run
never replaces an original, so ``--revert`` returns the host to how it was before the
first run. If any step fails, the files this run already changed are put back and the
manifest is left as it was.

Every file is reached through ``files.HostFiles`` (never through a symlinked
directory; as root, only below directories only root can change). Backups sit under
flat names (``etc%2Flibvirt%2Fqemu.conf``) in the one directory ``files/``, so no
directory tree below it can redirect them. Before the first change, ``preflight``
checks every directory the plan writes to and every program it runs, so a refusal
leaves the host untouched.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from ..errors import HostNotReadyError
from ..host.commands import CommandRunner
from ..host.root import HostRoot
from . import files
from .plan import HostPlan, Notice, Step, WriteFile

STATE = "/var/lib/tdxvirt/host-setup"
MANIFEST = f"{STATE}/manifest.json"
BACKUPS = f"{STATE}/files"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def backup_name(host_path: str) -> str:
    """A host path as one file name: ``/etc/libvirt/qemu.conf`` -> ``etc%2Flibvirt%2Fqemu.conf``."""
    return quote(host_path.lstrip("/"), safe="")


def backup_file(host_path: str, record: dict | None = None) -> str:
    """Where the original of ``host_path`` is kept (a host path).

    Records written before backups were flat (no ``backup`` key) kept it in a tree
    mirroring the host path; it is still read (never through a link) from there."""
    if record is not None and record.get("existed") and not record.get("backup"):
        return f"{BACKUPS}{host_path}"
    return f"{BACKUPS}/{backup_name(host_path)}"


@dataclass
class BackupStore:
    root: HostRoot

    @property
    def host(self) -> files.HostFiles:
        return files.HostFiles(self.root)

    @property
    def base(self) -> Path:
        return self.root.path(STATE)

    def backup_path(self, host_path: str, record: dict | None = None) -> Path:
        return self.root.path(backup_file(host_path, record))

    def load(self) -> dict:
        data = self.host.read_bytes(MANIFEST)
        if data is None:
            return {"version": 1, "files": {}, "undo": []}
        try:
            manifest = json.loads(data)
        except ValueError:
            raise HostNotReadyError(
                f"{MANIFEST} is not valid JSON; tdxvirt cannot tell what it changed "
                f"(backups are in {BACKUPS})") from None
        if not isinstance(manifest, dict):
            raise HostNotReadyError(f"{MANIFEST} is not a tdxvirt manifest; tdxvirt cannot "
                                    f"tell what it changed (backups are in {BACKUPS})")
        manifest.setdefault("files", {})
        manifest.setdefault("undo", [])
        return manifest

    def save(self, manifest: dict) -> None:
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        self.host.make_dir(STATE, 0o700)
        self.host.atomic_write(MANIFEST, text.encode(), new_mode=0o600, dir_mode=0o700)

    def remember(self, manifest: dict, host_path: str, state: files.FileState | None) -> None:
        """Keep the original of ``host_path`` unless an earlier run already kept one."""
        if host_path in manifest["files"]:
            return
        record: dict = {"existed": state is not None}
        if state is not None:
            self.host.make_dir(STATE, 0o700)
            self.host.atomic_write(backup_file(host_path), state.data, new_mode=0o600,
                                   dir_mode=0o700)
            record.update(mode=state.mode, uid=state.uid, gid=state.gid,
                          backup=backup_name(host_path))
        manifest["files"][host_path] = record

    def original(self, host_path: str, record: dict) -> bytes | None:
        if not record.get("existed"):
            return None
        data = self.host.read_bytes(backup_file(host_path, record))
        if data is None:
            raise HostNotReadyError(
                f"the backup of {host_path} is missing from {BACKUPS} "
                f"({backup_file(host_path, record)}); restore it by hand")
        return data

    def forget(self, manifest: dict, host_path: str) -> None:
        record = manifest["files"].pop(host_path, None)
        self.host.remove_file(backup_file(host_path, record))

    def clear_if_empty(self, manifest: dict) -> None:
        if manifest["files"] or manifest["undo"]:
            self.save(manifest)
        else:
            self.host.remove_file(MANIFEST)


def _parent(host_path: str) -> str:
    return host_path.rpartition("/")[0] or "/"


def preflight(plan: HostPlan, root: HostRoot, runner: CommandRunner,
              store: BackupStore | None = None) -> None:
    """Raise (one line) before any change if a step would be refused: a directory
    written to that is a symlink or someone else's, a program that would not be run."""
    host = files.HostFiles(root)
    for step in plan.files():
        host.check_writable(_parent(step.path))
    if store is not None and plan.files():
        host.check_writable(BACKUPS)
    check = getattr(runner, "check", None)
    if check is not None:
        for command in plan.commands():
            check(command.argv)


def _current(host: files.HostFiles, step: WriteFile) -> files.FileState | None:
    state = host.read_state(step.path)
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
    preflight(plan, root, runner, store)
    host = files.HostFiles(root)
    manifest = store.load() if store else None
    snapshot = json.loads(json.dumps(manifest)) if manifest is not None else None
    undo: list[tuple[WriteFile, files.FileState | None]] = []
    ran: list[str] = []

    def roll_back(reason: str) -> HostNotReadyError:
        restored = []
        for step, state in reversed(undo):
            try:
                if state is None:
                    host.remove_file(step.path)
                else:
                    host.atomic_write(step.path, state.data)
                restored.append(step.path)
            except HostNotReadyError as error:
                reason += f"; could not restore {step.path} ({error})"
        if store is not None and snapshot is not None and not reverting:
            for path in set(manifest["files"]) - set(snapshot["files"]):
                try:
                    host.remove_file(backup_file(path, manifest["files"][path]))
                except HostNotReadyError as error:
                    reason += f"; could not remove the backup of {path} ({error})"
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
                state = _current(host, step)
                if store is not None and manifest is not None and not reverting:
                    # The backup and its record exist before the file changes, so a
                    # run killed right after the write can still be reverted.
                    store.remember(manifest, step.path, state)
                    store.save(manifest)
                if step.new is None:
                    host.remove_file(step.path)
                else:
                    host.atomic_write(step.path, step.new, new_mode=step.mode,
                                      dir_mode=step.dir_mode)
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
