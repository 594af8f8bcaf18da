"""The root-owned TD record: the only thing tdxvirt trusts about what a TD should be.

A domain's XML and ``<metadata>`` can be edited by anyone libvirt lets manage domains
(``virsh edit``, ``virsh metadata --set``, virt-manager, a polkit-narrowed user), so
they are claims, never references. ``define`` (and ``repair``, ``adopt``) write one
record per TD, keyed by the domain's UUID, as root into ``<state dir>/records`` (0700,
each file 0600): the dialect, the policy and MR* values, the firmware, kernel and
initrd paths with each file's SHA-256 and size (tdxvirt.domain.recordfiles), the
measurements predicted from them, the GPUs, the QEMU arguments
tdxvirt wrote (and those the user opted into), the CPU mode, the storage it created
and the protected elements exactly as rendered. Integrity (and so the libvirt hook),
repair, measure, attest and storage removal read it; nothing in the domain's XML can
change it.

Reading is bounded and owner-checked: a record must be a regular file (not a FIFO,
device or symlink) of at most 1 MiB, owned by root (when tdxvirt runs as root) and
writable by nobody else. An unreadable or forged record is an error, never "no record":
a TD must not fall back to weaker rules because its record was tampered with.

This module imports nothing but the standard library, so the libvirt hook can load it
in the daemon's root with that root's Python.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

VERSION = 1
MAX_BYTES = 1 << 20
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class RecordError(Exception):
    """A record exists but cannot be trusted or read (one line, with the way out)."""


@dataclass(frozen=True)
class TDRecord:
    uuid: str
    name: str  # at define (a later `virsh domrename` is harmless)
    dialect: str  # native, canonical, qemu-args
    policy: int | None = None  # TD attributes asked for (launch security policy / tdx-guest attributes)
    mr_config_id: str | None = None
    mr_owner: str | None = None
    mr_owner_config: str | None = None
    loader: str | None = None  # None: libvirt picks a TDX firmware on the host (<os firmware='efi'>)
    # the QEMU binary at define: its digest is shown when it changed (`show`, `measure`),
    # never a reason to refuse a start (QEMU is outside a TD's measurements, and package
    # upgrades replace it)
    emulator: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    mrtd: str | None = None
    rtmr1: str | None = None
    rtmr2: str | None = None
    gpus: tuple[str, ...] = ()  # every PCI device tdxvirt passed through (dddd:bb:ss.f)
    qemu_args: tuple[str, ...] = ()  # <qemu:arg> values tdxvirt wrote, and those the user opted into
    cpu_mode: str = "host-passthrough"
    protected: str = ""  # <tdxvirt:protected> as rendered: what repair puts back
    overlay: str | None = None  # storage tdxvirt created for it
    seed: str | None = None
    title: str | None = None
    adopted: bool = False  # taken over from another tool by `tdxvirt adopt`
    # {"loader"|"kernel"|"initrd"|"emulator": {"sha256", "size"}} of the files above as recorded
    # (tdxvirt.domain.recordfiles); none in a record of an older tdxvirt: those are not checked
    digests: dict = field(default_factory=dict)
    version: int = VERSION
    extra: dict = field(default_factory=dict)  # forward-compatible room, never trusted for a decision

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TDRecord:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in data.items():
            if key not in known:
                continue
            if key in ("gpus", "qemu_args"):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{key} is not a list of strings")
                value = tuple(value)
            values[key] = value
        record = cls(**values)
        if not _UUID.match(record.uuid or ""):
            raise ValueError("no valid uuid")
        if record.policy is not None and not isinstance(record.policy, int):
            raise ValueError("policy is not a number")
        _check_digests(record.digests)
        return record


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _check_digests(digests) -> None:
    """A damaged digest is a damaged record (refused), never a file left unchecked."""
    if not isinstance(digests, dict):
        raise ValueError("digests is not an object")
    for key, value in digests.items():
        if key not in ("loader", "kernel", "initrd", "emulator") or not isinstance(value, dict) \
                or not _SHA256.match(str(value.get("sha256"))) \
                or not isinstance(value.get("size"), int) or isinstance(value.get("size"), bool) \
                or value["size"] < 0:
            raise ValueError(f"the digest of {key!r} is not a SHA-256 and a size")


def valid_uuid(text: str) -> bool:
    return bool(_UUID.match(text or ""))


class RecordStore:
    """The records of one host's TDs, in ``directory`` (``<state dir>/records``)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def path(self, uuid: str) -> Path:
        uuid = (uuid or "").lower()
        if not valid_uuid(uuid):
            raise RecordError(f"{uuid!r} is not a domain UUID")
        return self.directory / f"{uuid}.json"

    def exists(self, uuid: str) -> bool:
        try:
            return os.path.lexists(self.path(uuid))
        except RecordError:
            return False

    def read(self, uuid: str) -> TDRecord | None:
        """The record of this UUID; None when there is none; RecordError when one is
        there but cannot be trusted."""
        path = self.path(uuid)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as error:  # ELOOP: a symlink put where a record belongs
            raise RecordError(f"the TD record {path} cannot be opened ({error.strerror}); "
                              f"remove it and `tdxvirt adopt` the domain") from None
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise RecordError(f"the TD record {path} is not a regular file; remove it and "
                                  "`tdxvirt adopt` the domain")
            if status.st_uid != os.geteuid() or status.st_mode & 0o022:
                raise RecordError(f"the TD record {path} is owned by uid {status.st_uid} or "
                                  "writable by others, so it cannot be trusted; remove it and "
                                  "`tdxvirt adopt` the domain")
            data = os.read(fd, MAX_BYTES + 1)
        finally:
            os.close(fd)
        if len(data) > MAX_BYTES:
            raise RecordError(f"the TD record {path} is larger than 1 MiB; remove it and "
                              "`tdxvirt adopt` the domain")
        try:
            record = TDRecord.from_json(data.decode())
        except (ValueError, TypeError, UnicodeDecodeError) as error:
            raise RecordError(f"the TD record {path} is damaged ({error}); remove it and "
                              "`tdxvirt adopt` the domain") from None
        if record.uuid != path.stem:
            raise RecordError(f"the TD record {path} names another domain ({record.uuid}); "
                              "remove it and `tdxvirt adopt` the domain")
        return record

    def write(self, record: TDRecord) -> Path:
        """Write (or replace) the record atomically, 0600 in a 0700 directory."""
        path = self.path(record.uuid)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        temporary = self.directory / f".{record.uuid}.{os.getpid()}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(record.to_json())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            try:
                os.unlink(temporary)  # our own temporary file, just created with O_EXCL
            except FileNotFoundError:
                pass
            raise
        return path

    def remove(self, uuid: str) -> None:
        try:
            os.unlink(self.path(uuid))  # a record tdxvirt wrote, named by libvirt's UUID
        except FileNotFoundError:
            pass


def records_dir() -> Path:
    """This machine's records: ``<state dir>/records``."""
    from ..paths import state_dir

    return state_dir() / "records"


def local_store() -> RecordStore:
    return RecordStore(records_dir())
