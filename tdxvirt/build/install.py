"""``tdxvirt build install``: the built OVMF where libvirt looks, the built QEMU checked for define.

OVMF: the recorded OVMF.fd is copied to ``/usr/local/share/tdxvirt/firmware/<sha256>.fd``.
Named by its digest, a copy is never rewritten: a later build is another file, so a
TD defined with this one keeps booting the same firmware (and its MRTD). A QEMU
firmware descriptor (QEMU's docs/interop/firmware.json) naming the copy with feature
``intel-tdx`` goes to ``/etc/qemu/firmware/59-tdxvirt-x86_64-inteltdx.json``: the
administrator's folder, read with /usr/share/qemu/firmware, where descriptors are
taken in file-name order across both. 59 comes before Debian's
60-edk2-x86_64-inteltdx.json, so libvirt's firmware autoselection for a TD (and
``tdxvirt.host.firmware``) takes this one, and after the 40- and 50- descriptors of
general-purpose firmware, which plain VMs keep. ``define`` then uses the copy too
(``artifacts.recorded``).

QEMU: nothing is written. ``define`` already names the recorded QEMU as the domain's
<emulator> (the ``make install``-ed one before the build tree's: only that one has its
data files where QEMU looks), and libvirt's qemu.conf has no list of allowed
emulators. Install checks that the file is still the one built and, as root, that
only root can change it (libvirt runs it), and says what uses it.

Refused in one line with nothing changed: a component not built, an artifact that no
longer matches its recorded digest (as ``build status`` says), a file in the way
that tdxvirt did not write or that changed since, and (without --dry-run) not being
root. What is written is recorded (``install_record``) file by file, as it is
written; ``revert`` removes exactly those files, each only while it is as written,
and the folders install created, once empty.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, TdxvirtError
from ..host.trust import in_root, is_real_root, require_trusted
from . import artifacts, digests, install_record

FIRMWARE_DIR = "/usr/local/share/tdxvirt/firmware"
DESCRIPTOR_DIR = "/etc/qemu/firmware"
DESCRIPTOR_NAME = "59-tdxvirt-x86_64-inteltdx.json"
COMPONENTS = ("ovmf", "qemu")
MODE = 0o644


@dataclass(frozen=True)
class FileWrite:
    """One file install writes: a copy of a built file, or a text."""

    component: str
    path: Path  # where it is written on this machine (below the root)
    digest: digests.Digest  # what it will hold
    source: Path | None = None
    text: str | None = None

    def show(self) -> list[str]:
        if self.source is not None:
            return [f"copy {self.source} -> {self.path} (sha256 {self.digest.sha256}, mode 0644)"]
        return [f"write {self.path} (mode 0644):"] + [f"    {line}" for line in self.text.splitlines()]


@dataclass
class Plan:
    root: Path
    writes: list[FileWrite] = field(default_factory=list)  # to write
    current: list[FileWrite] = field(default_factory=list)  # there already, as they would be written
    notes: list[str] = field(default_factory=list)
    copies: dict[str, str] = field(default_factory=dict)  # OVMF build SHA-256 -> copy (inside the root)


def require_root(euid: int | None = None) -> None:
    if (os.geteuid() if euid is None else euid) != 0:
        raise InputError(f"`tdxvirt build install` needs root (it writes {DESCRIPTOR_DIR} and "
                         f"{FIRMWARE_DIR}); run it with sudo, or add --dry-run to see what it would write")


def descriptor(firmware: str, entry: dict) -> str:
    """The firmware descriptor naming ``firmware`` (QEMU's firmware.json schema: every
    member it requires; ``mapping`` as a TD loads the firmware, into memory)."""
    revision = (entry.get("patched_revision") or entry.get("revision") or "")[:12]
    source = " ".join(part for part in (str(entry.get("ref", "")), revision) if part)
    data = {
        "description": f"OVMF with Intel TDX support, built by tdxvirt ({source or 'unknown source'})",
        "interface-types": ["uefi"],
        "mapping": {"device": "memory", "filename": firmware},
        "targets": [{"architecture": "x86_64", "machines": ["pc-q35-*"]}],
        "features": ["intel-tdx"],
        "tags": [],
    }
    return json.dumps(data, indent=4) + "\n"


def _verified(record: dict, component: str, name: str, file: Path) -> tuple[str, digests.Digest]:
    """The artifact ``name`` of ``component`` and its recorded digest, refused when the
    file is not the one built."""
    entry = record.get(component)
    path = (entry.get("artifacts") or {}).get(name) if isinstance(entry, dict) else None
    if not isinstance(path, str):
        raise InputError(f"no {_NAMES[component]} was built: {file} records none; "
                         f"`tdxvirt build run {component}` builds it")
    recorded = (entry.get("digests") or {}).get(name)
    check = digests.check(path, recorded)
    if not check.ok:
        raise InputError(f"{component} {name}: {check.detail}; nothing was installed; "
                         f"`tdxvirt build run {component}` builds and records it again")
    return path, digests.Digest(recorded["sha256"], recorded["size"])


_NAMES = {"ovmf": "OVMF", "qemu": "QEMU"}


def plan(components: tuple[str, ...], root: Path, record_file: Path, installed: dict) -> Plan:
    """What installing ``components`` writes below ``root`` (nothing is changed). Of
    several components, those not built are left out; none built is refused."""
    record = artifacts.load(record_file)
    found = Plan(root)
    built = tuple(c for c in components if isinstance(record.get(c), dict))
    if len(components) > 1 and built:
        found.notes += [f"{_NAMES[c]}: not built, nothing to install" for c in components if c not in built]
        components = built
    if "ovmf" in components:
        _plan_ovmf(found, record, record_file)
    if "qemu" in components:
        found.notes.append(_check_qemu(record, record_file))
    _sort_targets(found, installed)
    for write in found.writes:  # as root: into folders only root can change
        require_trusted(write.path.parent, "install folder", missing_ok=True,
                        otherwise="move what is in the way, or make it root's alone")
    return found


def _plan_ovmf(found: Plan, record: dict, record_file: Path) -> None:
    path, digest = _verified(record, "ovmf", "OVMF.fd", record_file)
    copy = f"{FIRMWARE_DIR}/{digest.sha256}.fd"
    text = descriptor(copy, record["ovmf"])
    found.writes.append(FileWrite("ovmf", Path(in_root(found.root, copy)), digest, source=Path(path)))
    found.writes.append(FileWrite("ovmf", Path(in_root(found.root, f"{DESCRIPTOR_DIR}/{DESCRIPTOR_NAME}")),
                                  _digest_of(text.encode()), text=text))
    found.copies[digest.sha256] = copy
    if is_real_root(found.root):
        found.notes.append(f"OVMF: libvirt's firmware autoselection for a TD and `tdxvirt define` use {copy}")
    else:  # the descriptor names the copy as the system below the root will see it
        found.notes.append(f"OVMF: the system below {found.root} finds {copy} by its descriptor; "
                           "`tdxvirt define` here keeps the build tree's file")


def _check_qemu(record: dict, record_file: Path) -> str:
    used = artifacts.builds(record).get("qemu")
    entry = record.get("qemu") if isinstance(record.get("qemu"), dict) else {}
    paths = entry.get("artifacts") or {}
    name = next((n for n in ("installed", "qemu-system-x86_64") if used and paths.get(n) == used.path),
                "qemu-system-x86_64")
    path, _ = _verified(record, "qemu", name, record_file)
    require_trusted(path, "the built QEMU", otherwise="`sudo tdxvirt build run qemu --install` installs "
                    "it as root into QEMU's prefix")
    return (f"QEMU: nothing to write: `tdxvirt define` names {path} as a new TD's <emulator> "
            "(--qemu or the config's qemu choose another); a domain defined before keeps its "
            "own: `virsh edit NAME` changes its <emulator>")


def _digest_of(data: bytes) -> digests.Digest:
    import hashlib

    return digests.Digest(hashlib.sha256(data).hexdigest(), len(data))


def _sort_targets(found: Plan, installed: dict) -> None:
    """Leave out what is there already; refuse a file in the way that is not install's."""
    writes, found.writes = found.writes, []
    for write in writes:
        if not os.path.lexists(write.path):
            found.writes.append(write)
            continue
        try:
            now = digests.digest(write.path)
        except digests.DigestError as error:
            raise InputError(f"{error}: it is in the way of `tdxvirt build install`; move it away "
                             "and run it again") from None
        if now == write.digest:
            found.current.append(write)
            continue
        ours = (installed.get(write.component) or {}).get("files", {}).get(str(write.path))
        if ours != now.to_json():
            raise InputError(f"{write.path} exists and is not what `tdxvirt build install` wrote there "
                             "(or changed since); nothing was installed; move it away and run it again")
        found.writes.append(write)  # install's own older file (the descriptor of an earlier build)


def show(found: Plan, record: Path) -> list[str]:
    lines = [line for write in found.writes for line in write.show()]
    lines += [f"unchanged {write.path} (there already)" for write in found.current]
    if found.writes:
        lines.append(f"record what was written in {record}")
    return lines


def apply(found: Plan, record: Path) -> None:
    """Write the plan, each file renamed into place whole and recorded once written."""
    try:
        _apply(found, record)
    except OSError as error:  # a full disk, a read-only /etc: what was written is recorded
        raise TdxvirtError(f"cannot write {error.filename or 'a file'}: {error.strerror or error}; "
                           "the files written before are recorded: `tdxvirt build install --revert` "
                           "removes them") from None


def _apply(found: Plan, record: Path) -> None:
    installed = install_record.load(record)
    if found.copies:  # which build each firmware copy is of: define uses the copy
        entry = installed.setdefault("ovmf", {"files": {}, "folders": []})
        entry.update(root=str(found.root), copies={**entry.get("copies", {}), **found.copies})
    for write in found.writes:
        entry = installed.setdefault(write.component, {"files": {}, "folders": []})
        entry["root"] = str(found.root)
        entry["folders"] += [str(folder) for folder in _make_folders(write.path.parent)]
        install_record.save(record, installed)  # the folders made count even if the write fails
        _write(write)
        entry["files"][str(write.path)] = write.digest.to_json()
        entry["installed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        install_record.save(record, installed)
    install_record.save(record, installed)


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and the parents it lacks (0755); the ones created, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir(mode=0o755)
    return list(reversed(missing))


def _write(write: FileWrite) -> None:
    handle, temporary = tempfile.mkstemp(dir=write.path.parent, prefix=".tdxvirt-install.")
    try:
        with os.fdopen(handle, "wb") as out:
            if write.source is not None:
                # the copy is of the bytes digested here, not of a file checked before
                try:
                    copied = digests.digest(write.source, sink=out)
                except digests.DigestError as error:
                    raise InputError(f"cannot copy the built firmware: {error}") from None
                if copied != write.digest:
                    raise InputError(f"{write.source} changed while it was copied (sha256 "
                                     f"{copied.sha256[:16]}, not {write.digest.sha256[:16]} as "
                                     "recorded); run `tdxvirt build install` again")
            else:
                out.write(write.text.encode())
            out.flush()
            os.fchmod(out.fileno(), MODE)
            os.fsync(out.fileno())
        os.replace(temporary, write.path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Removal:
    files: tuple[str, ...]  # to remove
    gone: tuple[str, ...]  # recorded, no longer there
    folders: tuple[str, ...]  # created by install: removed when empty, innermost first


def _tds_using(paths: list[str]) -> dict[str, list[str]]:
    """The TDs whose root-owned record names one of these files as firmware, kernel or
    initrd (by path; this machine's records)."""
    from ..domain.record import RecordError, local_store

    store, users = local_store(), {}
    try:
        names = sorted(os.listdir(store.directory))
    except FileNotFoundError:
        return {}
    for name in names:
        if name.startswith(".") or not name.endswith(".json"):
            continue
        try:
            record = store.read(name.removesuffix(".json"))
        except RecordError as error:
            raise InputError(f"cannot tell which TDs use the installed files: {error}") from None
        for path in {record.loader, record.kernel, record.initrd} & set(paths) if record else ():
            users.setdefault(path, []).append(record.name)
    return users


def revert_plan(components: tuple[str, ...], installed: dict) -> Removal:
    """What reverting ``components`` removes; refused when a file changed since it was
    written, or when a TD's record names it (that TD would no longer start)."""
    files, gone, folders, seen = [], [], [], []
    for component in components:
        entry = installed.get(component) if isinstance(installed.get(component), dict) else {}
        seen += [path for path in (entry.get("copies") or {}).values() if isinstance(path, str)]
        for path, recorded in sorted((entry.get("files") or {}).items()):
            if not os.path.lexists(path):
                gone.append(path)
                continue
            check = digests.check(path, recorded)
            if not check.ok:
                raise InputError(f"{path} changed since `tdxvirt build install` wrote it ({check.state}); "
                                 "nothing was removed; move it away or restore it, then revert again")
            files.append(path)
        folders += reversed(entry.get("folders") or [])
    # by the path libvirt sees (a copy below another root is checked too: refusing is safe)
    if used := _tds_using(seen):
        path, tds = next(iter(used.items()))
        raise InputError(f"{path} is the firmware of TD(s) {', '.join(sorted(tds))} (root's records); "
                         "nothing was removed; undefine them, or define them anew with another "
                         "firmware, then revert again")
    return Removal(tuple(files), tuple(gone), tuple(folders))


def show_revert(removal: Removal, done: bool = False) -> list[str]:
    if done:
        return ([f"removed {path}" for path in removal.files]
                + [f"forgot {path} (already gone)" for path in removal.gone]
                + [f"removed folder {path}" for path in removal.folders])
    return ([f"remove {path}" for path in removal.files]
            + [f"forget {path} (already gone)" for path in removal.gone]
            + [f"remove folder {path} (if empty then)" for path in removal.folders])


def revert(components: tuple[str, ...], record: Path) -> Removal:
    installed = install_record.load(record)
    removal = revert_plan(components, installed)
    for path in removal.files:
        os.unlink(path)
    removed = []
    for folder in removal.folders:
        try:
            os.rmdir(folder)
            removed.append(folder)
        except OSError:  # not empty (or gone): someone else's files stay
            pass
    for component in components:
        installed.pop(component, None)
    install_record.save(record, installed)
    return Removal(removal.files, removal.gone, tuple(removed))
