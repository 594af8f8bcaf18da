"""The files a TD record names, and whether each is still the file that was recorded.

MRTD is a hash of the firmware image, RTMR1 and RTMR2 of a directly booted kernel and
initrd. A file replaced at the recorded path (a package upgrade, a rebuild, another
OVMF.fd copied over it) boots a TD whose measurements are no longer those predicted at
define, and attestation then fails far from the cause. So ``define`` and ``adopt``
record each file's SHA-256 and size (``digests_of``), and at every start libvirt's
hook (tdxvirt.enforce.hook, through tdxvirt.domain.integrity) compares the file at
that path with them (``check``); ``start``, ``show`` and ``measure`` do the same on a
local URI. ``<os firmware='efi'>`` with no loader recorded (libvirt picks a firmware
at each start) leaves no file to record.

Each file is read once, streamed, through tdxvirt.filedigest: a regular file only
(opened O_NONBLOCK, so a FIFO put at the path cannot hang the daemon waiting on the
hook; refused by fstat before a byte is read), symbolic links followed as QEMU follows
them, and no more than a bound per kind of file (``LIMITS``). A record of an older
tdxvirt holds no digests: its files are not checked (and ``show`` says so), never
refused.

Standard library only: the hook loads it with the daemon root's Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..filedigest import Digest, DigestError, digest

# What a file may be, per record field. A TDVF/OVMF image is 2 to 4 MiB; 64 MiB is ample
# room and keeps the hook's read short. A distribution's kernel is ~15 MiB and an
# initrd with NVIDIA's driver a few hundred MiB; QEMU must place the initrd below the
# guest's 32-bit memory top (2 GiB on q35 with more RAM), so 1 GiB holds any initrd
# that boots while bounding what a start waits for (~1 s of SHA-256 per GiB).
# QEMU's system emulator is 20-100 MiB.
LIMITS = {"loader": 64 << 20, "kernel": 1 << 30, "initrd": 1 << 30, "emulator": 512 << 20}
NAMES = {"loader": "firmware", "kernel": "kernel", "initrd": "initrd", "emulator": "QEMU"}
# The files a start is refused for when they changed: those the TD's measurements are
# predicted from. QEMU is not measured (the TDX module measures the TD, not the VMM) and
# package upgrades replace it: its change is shown, never refused, and the hook does not
# read it (a start does not wait for hashing a binary it would not judge).
ENFORCED = ("loader", "kernel", "initrd")
# what a changed file no longer matches
_MEASURES = {"loader": "MRTD", "kernel": "RTMR1/RTMR2", "initrd": "RTMR1/RTMR2"}

SAME, CHANGED, MISSING, UNREADABLE, UNRECORDED = "same", "changed", "missing", "unreadable", "unrecorded"


def _as_is(path: str) -> str:
    return path


def digests_of(paths: dict[str, str | None], host_path: Callable[[str], object] = _as_is,
               unread: list[str] | None = None) -> dict:
    """``{"loader": {"sha256", "size"}, ...}`` of the files the record names (``paths``:
    field -> path on the TD's host; ``host_path`` maps one to where this process reads
    it, a fake host root in tests). A file that cannot be read raises DigestError,
    naming it as the host sees it; given ``unread``, it is left out and named there."""
    found = {}
    for field, path in paths.items():
        if not path:
            continue
        try:
            found[field] = digest(host_path(path), LIMITS[field], f"a TD's {NAMES[field]}").to_json()
        except DigestError as error:
            if field not in ENFORCED:  # shown when known, never a reason to refuse or warn
                continue
            named = DigestError(f"its {NAMES[field]} {path}", error.reason, error.missing)
            if unread is None:
                raise named from None
            unread.append(str(named))
    return found


@dataclass(frozen=True)
class FileState:
    """One recorded file against what is at its path now."""

    field: str  # the record's: loader, kernel, initrd
    path: str  # as the TD's host sees it
    state: str  # SAME, CHANGED, MISSING, UNREADABLE, UNRECORDED (an older record: not read)
    recorded: dict | None = None  # {"sha256", "size"}
    found: Digest | None = None
    reason: str = ""  # why it cannot be read (MISSING, UNREADABLE)

    @property
    def name(self) -> str:
        return NAMES[self.field]

    @property
    def wrong(self) -> bool:
        """Whether the TD must not start with it (a measured file only, see ENFORCED)."""
        return self.field in ENFORCED and self.state in (CHANGED, MISSING, UNREADABLE)

    def what(self) -> str:
        """What is wrong, for a refusal (one phrase)."""
        recorded = _short(self.recorded["sha256"]) if self.recorded else "-"
        if self.state == CHANGED:
            return (f"its {self.name} {self.path} is not the file recorded (sha256 {recorded} "
                    f"recorded, {_short(self.found.sha256)} found): the TD's "
                    f"{_MEASURES.get(self.field, 'measurement')} changes with it")
        return f"its {self.name} {self.path} (sha256 {recorded} recorded) {self.reason}"

    def as_dict(self) -> dict:
        """For --json (`show`'s and `measure`'s ``recorded_files``)."""
        return {"file": self.name, "path": self.path, "state": self.state,
                "recorded_sha256": (self.recorded or {}).get("sha256"),
                "found_sha256": self.found.sha256 if self.found else None, "detail": self.describe()}

    def describe(self) -> str:
        """The file's state, for `show` and `measure`."""
        if self.state == SAME:
            return f"sha256 {_short(self.found.sha256)}, {self.found.size} bytes, as recorded"
        if self.state == UNRECORDED:
            return ("no digest recorded (an older tdxvirt's record, or the file could not be read "
                    "at define): not checked")
        recorded = f"sha256 {_short(self.recorded['sha256'])} recorded"
        if self.state == CHANGED:
            return (f"CHANGED since recorded: {recorded} ({self.recorded['size']} bytes), "
                    f"{_short(self.found.sha256)} ({self.found.size} bytes) found")
        return f"{recorded}, but it {self.reason}"


def check(record, host_path: Callable[[str], object] = _as_is,
          fields: tuple[str, ...] = tuple(LIMITS)) -> tuple[FileState, ...]:
    """Each file ``record`` (a TDRecord) names against its recorded digest, the file read
    where ``host_path`` maps it (as is: the hook, on the TD's own host), of ``fields``
    (the hook: ENFORCED). A file with no recorded digest is not read."""
    states = []
    for field in fields:
        path = getattr(record, field, None)
        if not path:
            continue
        recorded = (record.digests or {}).get(field)
        if recorded is None:
            states.append(FileState(field, path, UNRECORDED))
            continue
        try:
            found = digest(host_path(path), LIMITS[field], f"a TD's {NAMES[field]}")
        except DigestError as error:
            states.append(FileState(field, path, MISSING if error.missing else UNREADABLE, recorded,
                                    reason=error.reason))
            continue
        same = found.sha256 == recorded["sha256"] and found.size == recorded["size"]
        states.append(FileState(field, path, SAME if same else CHANGED, recorded, found))
    return tuple(states)


def _short(sha256: str) -> str:
    return sha256[:12]
