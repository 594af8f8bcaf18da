"""Defining and driving TDs through the libvirt API.

Functions take an open libvirt connection and raise tdxvirt errors; they print
nothing. The CLI is a thin layer over them.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import locks
from ..domain.storage_paths import forget_created, record_created
from ..errors import (
    HostNotReadyError,
    InputError,
    LibvirtOperationError,
    LibvirtUnavailableError,
    TdxvirtError,
)
from ..virt.conn import libvirt_error_type, translate, xmls_of_listed
from ..virt.lookup import _absent, lookup, parsable_xml, resolved  # noqa: F401  (tds' callers)
from . import journal

if TYPE_CHECKING:  # rendering, planning and XML reading (lxml) are imported only by the
    # functions that use them: `list` starts reading domains before lxml is loaded
    from ..domain.domainxml import DomainFacts
    from ..domain.policy import Disk
    from ..domain.spec import TDSpec
    from ..facts import HostFacts
    from ..host import HostRoot
    from .assemble import AssembledTD


# virDomainDefineFlags VIR_DOMAIN_DEFINE_VALIDATE: without it libvirt silently drops
# unknown elements (and accepts a relative quote-service path).
DEFINE_VALIDATE = 1
# virDomainState values, as virsh names them.
STATE_NAMES = {0: "no state", 1: "running", 2: "blocked", 3: "paused", 4: "shutting down",
               5: "shut off", 6: "crashed", 7: "suspended"}
SHUTOFF, SHUTOFF_SAVED = 5, 5  # VIR_DOMAIN_SHUTOFF, reason VIR_DOMAIN_SHUTOFF_SAVED
STATS_STATE = 1  # VIR_DOMAIN_STATS_STATE
UNDEFINE_NVRAM = 4  # VIR_DOMAIN_UNDEFINE_NVRAM
XML_INACTIVE = 2  # VIR_DOMAIN_XML_INACTIVE
METADATA_ELEMENT, AFFECT_LIVE = 2, 1  # VIR_DOMAIN_METADATA_ELEMENT, VIR_DOMAIN_AFFECT_LIVE


@dataclass(frozen=True)
class TDRow:
    facts: DomainFacts
    state: str
    uptime: float | None = None  # seconds, when tdxvirt started it
    problems: tuple[str, ...] = ()  # tdxvirt.domain.integrity: how it is no longer the TD defined
    recorded: bool = False  # root holds a record of it (listed even with its marks stripped)


@dataclass(frozen=True)
class TDInfo:
    row: TDRow
    uuid: str
    autostart: bool
    persistent: bool
    problems: tuple[str, ...]
    builds: tuple[str, ...]  # the `tdxvirt build` results its emulator and firmware come from
    record: str = "none"  # root's record of it: recorded, adopted, none, or why it is not trusted
    title: str | None = None
    measurements: dict | None = None  # MRTD/RTMRs predicted at define: root's record's, else the metadata's
    disks: tuple[dict, ...] = ()  # as `virsh domblklist --details` (DomainXML.disk_table)
    interfaces: tuple[dict, ...] = ()  # as `virsh domiflist` (DomainXML.interface_table)
    files: tuple[dict, ...] = ()  # the firmware, kernel and initrd root recorded, each checked
    files_note: str = ""  # why there is nothing in ``files`` to check here


def read_facts(xml: str, name: str | None = None) -> DomainFacts:
    """read_domain_xml that survives a hostile domain (see parsable_xml); ``name``, the
    name libvirt reports, replaces the one parsed from the XML (which the XML parser
    normalises: a CR in a name reads back as LF)."""
    return _parse(xml, name)[1]


def _parse(xml: str, name: str | None = None):
    """(the indexed domain, its facts) of a domain's XML, as read_facts reads it."""
    from dataclasses import replace

    from lxml import etree

    from ..domain.domainxml import DomainXML, facts_of

    try:
        root = etree.fromstring(xml.encode())
    except etree.XMLSyntaxError:  # rare: only then the extra pass over the text
        root = etree.fromstring(parsable_xml(xml).encode())
    domain = DomainXML(root)
    facts = facts_of(domain)
    return domain, facts if name is None or facts.name == name else replace(facts, name=name)


def integrity_problems(conn, domain, xml_or_root, host=None, files: bool = False) -> list:
    """tdxvirt.domain.integrity's problems of a domain, with the facts this connection has
    (integrity_inputs)."""
    from ..domain.integrity import problems

    return problems(xml_or_root, **integrity_inputs(conn, domain, host, files))


def integrity_inputs(conn, domain, host=None, files: bool = False) -> dict:
    """What tdxvirt.domain.integrity.problems needs to know beyond the XML: the target
    libvirt's version, a managed-save image, whether the driver keeps
    <qemu:commandline>, and (given the host's facts or this machine's HostRoot, see
    tdxvirt.facts.facts_for) the MMIO window the hostdevs' BARs need, where their
    sizes are known. ``files``: also the recorded firmware, kernel and initrd against
    the files now at their paths (recorded_files)."""
    needed = None
    if host is not None:
        from ..facts import facts_for

        needed = _window_needed(facts_for(conn, host))
    try:
        saved = bool(domain.hasManagedSaveImage(0))
    except libvirt_error_type():
        saved = False
    record = record_of(conn, domain)
    inputs = {"libvirt_version": conn.getLibVersion(), "window_needed_mib": needed,
              "managed_save": saved, "commandline_kept": _keeps_commandline(conn),
              "record": record, "memory_snapshots": memory_snapshots(domain)}
    if files:
        inputs["files"] = recorded_files(conn, record, host)
    return inputs


def recorded_files(conn, record, host=None) -> tuple | None:
    """The files root's record names, each against the file now at its path
    (tdxvirt.domain.recordfiles.check), read below the host root (``host``: this
    machine's HostRoot or the host's facts; None: ``/``); None when they cannot be
    known here: no trusted record, or a remote URI (that host's hook checks its own)."""
    from ..domain.record import TDRecord
    from ..domain.recordfiles import check
    from ..facts import facts_for

    if not isinstance(record, TDRecord):
        return None
    facts = facts_for(conn, host)
    if facts.remote:
        return None
    return check(record, facts.host.path)


def record_of(conn, domain):
    """Root's record of this TD (tdxvirt.domain.record) where it runs on this machine; a
    RecordError when one is there but untrustworthy; None for none, and for a remote
    URI, whose TDs' records live on that host (docs/security.md)."""
    store = record_store(conn)
    return None if store is None else _stored(store, domain.UUIDString())


def record_store(conn):
    """This machine's records for a local URI; None for a remote one."""
    from ..domain.record import local_store
    from ..virt.conn import is_remote

    return None if is_remote(conn.getURI()) else local_store()


def _stored(store, uuid: str):
    from ..domain.record import RecordError

    try:
        return store.read(uuid)
    except RecordError as error:
        return error


def memory_snapshots(domain) -> tuple[str, ...]:
    """The names of the domain's snapshots that hold memory (internal or external): a
    revert resumes that memory instead of booting a measured TD."""
    from lxml import etree

    try:
        snapshots = domain.listAllSnapshots(0)
    except libvirt_error_type():
        return ()
    found = []
    for snapshot in snapshots:
        try:
            root = etree.fromstring(snapshot.getXMLDesc(0).encode())
        except (libvirt_error_type(), etree.XMLSyntaxError):
            found.append(snapshot.getName())  # unreadable: assume the worst
            continue
        memory = root.find("memory")
        if memory is not None and memory.get("snapshot", "no") != "no" or memory is None and \
                root.findtext("state") in ("running", "paused", "pmsuspended"):
            found.append(snapshot.getName())
    return tuple(found)


def _keeps_commandline(conn) -> bool:
    """libvirt's test driver drops <qemu:commandline>; every real driver keeps it."""
    return conn.getType().upper() != "TEST"


def _window_needed(facts):
    """The MMIO window (MiB) define would size for these devices, from the host's facts
    (None: a device it lacks, which preflight names, or whose BARs are unknown)."""
    def needed(bdfs: list[str]) -> int | None:
        from ..domain.policy import mmio_window_mb
        from ..pci import PciAddress

        try:
            return mmio_window_mb([facts.device(PciAddress.parse(bdf)) for bdf in bdfs])
        except (TdxvirtError, OSError, ValueError):
            return None
    return needed


def _exists(conn, name: str) -> bool:
    try:
        conn.lookupByName(name)
        return True
    except libvirt_error_type() as error:
        if _absent(error):
            return False
        raise translate(error, f"cannot look up {name!r}") from None


# Modes of the files tdxvirt creates, owned by root and QEMU's group (assemble.storage_owner):
# QEMU writes the overlay (the TD's disk) and only reads the seed. Nobody else may read
# either: the overlay holds the guest's disk, the seed's user-data may hold secrets.
OVERLAY_MODE = 0o660
SEED_MODE = 0o640
_RENAME_NOREPLACE = 1  # linux/fs.h


def checked_storage_dir(directory: str) -> str:
    """The storage directory's real path, created when missing (mode 0711, like
    /var/lib/libvirt/images).

    For root, the directory must be root-owned and writable by nobody else, and so
    must every directory above it (a sticky one such as /tmp excepted): anyone who can
    write there could plant ``NAME.qcow2 -> /victim`` or swap a directory, and root
    would write through it (issue #18)."""
    import stat

    try:
        os.makedirs(directory, mode=0o711, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the storage directory {directory}: "
                         f"{error.strerror}; create it, or set defaults.overlay_dir") from None
    real = os.path.realpath(directory)
    from ..host.trust import trust_problem  # the one walk that judges paths root may trust

    problem = trust_problem(real)  # None when not root
    if problem is None:
        return real
    path = problem.path
    last = path == real
    what = "the storage directory" if last else f"{path}, a directory above the storage directory"
    fix = f"; `chown root {path}` and `chmod go-w {path}`, or set defaults.overlay_dir"
    if problem.owner is not None:
        raise InputError(f"{what} {real} is owned by uid {problem.owner}, not root; root "
                         f"creates files there that its owner could redirect" + fix)
    if problem.writable:
        mode = stat.S_IMODE(os.lstat(path).st_mode)
        raise InputError(f"{what} {real if last else path} is writable by group or others "
                         f"(mode {mode:04o}), who could plant links root would write through" + fix)
    raise InputError(f"{what} {path} {problem.other}; try again" + fix)


def _place(temporary: str, final: str) -> None:
    """Move ``temporary`` to ``final`` only if nothing is there, not even a dangling
    symlink: link(2) never replaces (nor follows) its target; where hard links are
    not supported, renameat2(RENAME_NOREPLACE)."""
    try:
        os.link(temporary, final, follow_symlinks=False)
        os.unlink(temporary)
        return
    except FileExistsError:
        raise InputError(f"{final} already exists; remove it or choose another TD name") from None
    except OSError as error:
        import errno

        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
            raise TdxvirtError(f"cannot create {final}: {error.strerror}") from None
    _rename_noreplace(temporary, final)


def _place_recorded(temporary: str, final: str) -> None:
    """Record ``final`` as tdxvirt's (by the inode it is about to get), then place it:
    the only proof undefine --remove-storage and an interrupted define's undo accept."""
    record_created(final, inode_of=temporary)
    try:
        _place(temporary, final)
    except BaseException:
        forget_created(final)
        raise


def _rename_noreplace(source: str, target: str) -> None:
    import ctypes
    import errno

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise TdxvirtError(f"cannot create {target}: its file system has no hard links and "
                           "this C library no renameat2")
    if renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target),
                 _RENAME_NOREPLACE) != 0:
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise InputError(f"{target} already exists; remove it or choose another TD name")
        raise TdxvirtError(f"cannot create {target}: {os.strerror(code)}")


def _private_file(directory: str, name: str, uuid: str):
    """A path in a new private (0700) directory inside ``directory`` (same file system,
    so the result can be linked into place), and a cleanup for that directory. Named
    after the TD's UUID: a killed define's directory is found by the next run
    (tdxvirt.lifecycle.journal)."""
    import shutil
    import tempfile

    try:
        private = tempfile.mkdtemp(prefix=journal.private_prefix(uuid), dir=directory)
    except OSError as error:  # no space or inodes, read-only, no permission: one line
        raise TdxvirtError(f"cannot create a private directory in {directory} ({error.strerror}); "
                           "free space there or set defaults.overlay_dir; nothing was defined") from None
    return os.path.join(private, name), lambda: shutil.rmtree(private, ignore_errors=True)


def _own(path: str, owner, mode: int) -> None:
    """root:<QEMU's group> (as root; another user keeps its own files) and ``mode``."""
    if owner is not None:
        os.chown(path, 0, owner.gid, follow_symlinks=False)
    os.chmod(path, mode, follow_symlinks=False)


def _storage_owner(host: HostRoot):
    """Who the created files belong to (None when not root: the files stay the user's)."""
    if os.geteuid() != 0:
        return None
    from .assemble import storage_owner

    return storage_owner(host)


def _closed_to_qemu(host: HostRoot, path: str, gid: int) -> str | None:
    """The first directory above ``path`` that QEMU (running in group ``gid``, not root)
    cannot search, as its mode says (ACLs aside); None when each one lets it through.
    libvirt gives QEMU the image files it opens, never the directories above them."""
    import stat

    directory = os.path.dirname(path)
    parents = []
    while directory not in ("/", ""):
        parents.append(directory)
        directory = os.path.dirname(directory)
    for directory in reversed(parents):
        try:
            status = os.stat(host.path(directory))
        except OSError:
            return None  # missing or unreadable here: the start says what it finds
        mode = stat.S_IMODE(status.st_mode)
        if not mode & stat.S_IXOTH and not (status.st_gid == gid and mode & stat.S_IXGRP):
            return directory
    return None


def _create_overlay(disk: Disk, uuid: str, owner=None) -> None:
    """A qcow2 overlay on the base image; the base is only ever read.

    qemu-img writes it in a private directory, then it is linked into place without
    replacing anything: a symlink planted at the overlay's name makes define fail, it
    never makes root write through it (issue #18)."""
    directory = checked_storage_dir(os.path.dirname(disk.path))
    final = os.path.join(directory, os.path.basename(disk.path))
    if os.path.lexists(final):
        raise InputError(f"{disk.path} already exists; remove it or choose another TD name")
    temporary, cleanup = _private_file(directory, os.path.basename(disk.path), uuid)
    try:
        try:
            result = subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-F", disk.base_format, "-b",
                 disk.overlay_base, temporary], capture_output=True, text=True, check=False,
                stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise HostNotReadyError("qemu-img is not installed (Debian: qemu-utils); it "
                                    "creates the overlay") from None
        if result.returncode != 0:
            raise LibvirtOperationError(
                f"qemu-img could not create the overlay {disk.path}: "
                f"{' '.join(result.stderr.split()) or 'exit ' + str(result.returncode)}")
        _own(temporary, owner, OVERLAY_MODE)
        _place_recorded(temporary, final)
    finally:
        cleanup()


def assemble_td(conn, host: HostRoot, spec: TDSpec, config=None,
                check_schema: bool = True) -> AssembledTD:
    from .assemble import assemble_td as assemble

    return assemble(conn, host, spec, config, check_schema)


def gpu_holders(conn) -> dict[str, str]:
    from .assemble import gpu_holders as holders

    return holders(conn)


def define_td(conn, host: HostRoot | HostFacts, spec: TDSpec, config=None) -> AssembledTD:
    """Define the TD; on any failure nothing is left behind (no domain, no overlay).

    ``host``: this machine's HostRoot (read only for a URI naming no host), or the
    host's facts (tdxvirt.facts.facts_for). The name and the GPUs are locked, per host,
    from the checks to the define, so a second tdxvirt asking for either waits, then
    sees the first one's domain.
    """
    from ..facts import facts_for

    facts = facts_for(conn, host)
    try:
        uri = conn.getURI()  # to ask again if the connection is lost mid-define
    except libvirt_error_type() as error:
        raise translate(error, f"cannot define {spec.name!r}") from None
    finished = [] if facts.remote else recover_interrupted(conn)
    with locks.held([locks.name_key(facts.lock_host, spec.name),
                     *locks.gpu_keys(facts.lock_host, spec.gpus)]):
        if _exists(conn, spec.name):
            raise InputError(
                f"a domain named {spec.name!r} already exists at {conn.getURI()}; "
                "choose another name or `tdxvirt undefine` it first"
            )
        td = assemble_td(conn, facts, spec, config, check_schema=False)  # libvirt validates
        overlay = td.plan.disk if td.plan.disk and td.plan.disk.overlay_base else None
        # only a local URI creates files (assemble refuses them for a remote one)
        owner = _storage_owner(facts.host) if (overlay or td.plan.seed) and not facts.remote \
            else None
        if owner is not None and owner.note:
            td = _with_warning(td, owner.note)
        if overlay and owner is not None and owner.group is not None and owner.gid != 0:
            closed = _closed_to_qemu(facts.host, overlay.overlay_base, owner.gid)
            if closed:
                td = _with_warning(td, f"QEMU (group {owner.group}) cannot enter {closed}, above the "
                                       f"base image {overlay.overlay_base}: the start will fail with "
                                       f"'Permission denied'; `chmod o+x {closed}`, or keep the image "
                                       "in a directory QEMU may enter")
        # Files first, then libvirt's define, then root's record: an intent names them
        # for the next run should this one be killed in between (tdxvirt.lifecycle.journal).
        files = [path for path in (overlay.path if overlay else None, td.plan.seed) if path]
        intent = journal.begin(journal.Intent("define", uri, td.plan.uuid, spec.name,
                                              tuple(files), journal.this_process())) \
            if files and td.plan.uuid else None
        created = []
        try:
            if overlay:
                _create_overlay(overlay, td.plan.uuid, owner)
                created.append(overlay.path)
            if td.plan.seed:
                _create_seed(spec, td.plan.seed, td.plan.uuid, owner)
                created.append(td.plan.seed)
            defined = conn.defineXMLFlags(td.xml, DEFINE_VALIDATE)
        except libvirt_error_type() as error:
            answer = translate(error, f"libvirt refused to define {spec.name!r}")
            # A lost connection is no refusal: libvirt may have saved the domain before its
            # answer was lost. Asked again (the UUID is tdxvirt's own), it says which; when
            # it cannot be asked, the intent stays for the next run to ask.
            defined = _defined_after_all(uri, td.plan.uuid) \
                if isinstance(answer, LibvirtUnavailableError) else None
            if defined is None:
                _undo(created, intent)
                raise answer from None
        except BaseException:
            _undo(created, intent)
            raise
        if td.plan.tdx:
            try:
                unread = _record(defined, td, facts)
            except BaseException:
                _undefine_quietly(defined)
                _undo(created, intent)
                raise
            if unread:
                td = _with_warning(td, unread)
        if intent is not None:
            journal.end(intent)
    return _with_warning(td, "; ".join(finished)) if finished else td


def _undo(created: list[str], intent) -> None:
    """A define that did not happen: its files go, then its intent."""
    _remove(created)
    if intent is not None:
        journal.end(intent)


def _defined_after_all(uri: str, uuid: str | None):
    """The domain of this UUID when a new connection finds it (libvirt saved it before the
    old connection was lost); None when libvirt does not have it. When libvirt cannot be
    asked again at all, nothing can be decided: the files define made stay (they may be a
    saved domain's disks) and the one line says how to find out."""
    from ..virt.conn import open_connection

    if uuid is None:
        return None
    try:
        again = open_connection(uri)
    except TdxvirtError:
        raise LibvirtUnavailableError(
            f"the libvirt connection was lost during define and libvirt cannot be asked again "
            f"at {uri}: whether the domain was saved is unknown, so its files were kept; when "
            f"libvirt answers, `virsh -c {uri} dominfo {uuid}` says (then `tdxvirt adopt` it, "
            "or remove the files and define again)") from None
    try:
        return again.lookupByUUIDString(uuid)
    except libvirt_error_type() as error:
        if _absent(error):
            return None
        raise translate(error, f"cannot ask libvirt again whether {uuid} was defined") from None


def _record(domain, td: AssembledTD, facts: HostFacts) -> str | None:
    """Root's record of the TD just defined (tdxvirt.domain.record), from the XML
    tdxvirt rendered; the firmware libvirt chose when it was left to libvirt; the
    SHA-256 of the files it boots, read below the host root. A remote host's TDs are not
    recorded here: their hook can only read its own host's records (docs/security.md).

    Like the measurements, define records what it can: a file it cannot read (not in
    place yet) gets no digest, so its starts do not check it, and the warning returned
    says so and how to record it (`adopt`, once the file is there)."""
    if facts.remote:
        return None
    from ..domain.domainxml import DomainXML
    from ..domain.record import local_store
    from ..domain.recorded import record_from

    loader = emulator = None
    if not td.plan.loader or not td.plan.emulator:  # what libvirt chose for the TD
        try:
            defined = DomainXML.of(parsable_xml(domain.XMLDesc(XML_INACTIVE)))
            loader, emulator = defined.loader_path() or None, defined.emulator() or None
        except libvirt_error_type():
            pass
    unread: list[str] = []
    record = record_from(td.xml, td.plan.uuid, loader=None if td.plan.loader else loader,
                         emulator=emulator, host_path=facts.host.path, unread=unread)
    try:
        local_store().write(record)
    except OSError as error:
        raise TdxvirtError(f"cannot write the TD record of {td.plan.name!r} ({error.strerror}); "
                           "nothing was defined") from None
    if not unread:
        return None
    return (f"{'; '.join(unread)}: root's record holds no SHA-256 of it, so its starts do not check "
            f"that the file is the one its measurements were predicted from; once it is in place, "
            f"`tdxvirt adopt {shlex.quote(td.plan.name)}` records it")


def _undefine_quietly(domain) -> None:
    try:
        domain.undefine()
    except libvirt_error_type():
        pass


def _with_warning(td: AssembledTD, warning: str) -> AssembledTD:
    from dataclasses import replace

    return replace(td, plan=replace(td.plan, warnings=(*td.plan.warnings, warning)))


def _create_seed(spec: TDSpec, path: str, uuid: str, owner=None) -> None:
    """The cloud-init seed, written privately and linked into place like the overlay,
    mode 0640 root:<QEMU's group> (user-data may hold secrets)."""
    from ..guest.seed import build_seed_iso
    from ..guest.userdata import hostname_for

    directory = checked_storage_dir(os.path.dirname(path))
    final = os.path.join(directory, os.path.basename(path))
    if os.path.lexists(final):
        raise InputError(f"{path} already exists; remove it or choose another TD name")
    temporary, cleanup = _private_file(directory, os.path.basename(path), uuid)
    try:
        build_seed_iso(temporary, hostname=hostname_for(spec.name), ssh_keys=spec.ssh_keys,
                       user_data=spec.user_data, imex_channel=spec.imex_channel)
        _own(temporary, owner, SEED_MODE)
        _place_recorded(temporary, final)
    finally:
        cleanup()


def _remove(paths: list[str]) -> None:
    """Undo what a failed define created, newest first."""
    for path in reversed(paths):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        forget_created(path)


def start(conn, host: HostRoot | HostFacts, name, skip_preflight: bool = False,
          read_modes=None) -> bool:
    """Start a TD after a preflight; False when it was already running.

    ``host``: this machine's HostRoot or the host's facts (tdxvirt.facts.facts_for).
    ``read_modes`` reads the GPUs' CC / PPCIe modes (HostFacts.mode_reader); None
    leaves them unchecked."""
    from ..facts import facts_for

    facts = facts_for(conn, host)
    domain = lookup(conn, name)
    name = domain.name()  # the resolved name, for messages
    if domain.isActive():
        return False
    # the persistent definition: what a start runs, and unchanged by another tool's start
    xml = parsable_xml(domain.XMLDesc(XML_INACTIVE))
    with locks.held(locks.gpu_keys(facts.lock_host, read_facts(xml).gpus)):
        # Not a preflight to skip: a TD never boots unprotected or broken by an edit.
        weakened = integrity_problems(conn, domain, xml, facts, files=True)
        if weakened:
            more = (f" (and {len(weakened) - 1} more: {'; '.join(map(str, weakened[1:]))})"
                    if len(weakened) > 1 else "")
            raise HostNotReadyError(f"{name!r} is no longer the TD it was defined as: "
                                    f"{weakened[0].what}; {weakened[0].fix}{more}")
        if not skip_preflight:
            from .preflight import start_problems

            problems = start_problems(conn, facts, xml, read_modes)
            if problems:
                more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
                raise HostNotReadyError(f"{domain.name()!r} would not start safely: "
                                        f"{problems[0]}{more}; --skip-preflight overrides")
        # What was checked is what starts: another tool may have redefined it meanwhile.
        if parsable_xml(domain.XMLDesc(XML_INACTIVE)) != xml:
            raise HostNotReadyError(f"{name!r} was redefined while tdxvirt checked it; "
                                    f"run `tdxvirt start {name}` again to check the new definition")
        try:
            domain.create()
        except libvirt_error_type() as error:
            if _running(domain):  # another tdxvirt, virsh or virt-manager started it meanwhile
                return False
            raise translate(error, f"cannot start {name!r}") from None
    _mark_started(domain)
    return True


def _running(domain) -> bool:
    try:
        return bool(domain.isActive())
    except libvirt_error_type():
        return False


def _mark_started(domain) -> None:
    """Live-only metadata with the start time, so list can show uptime."""
    from ..domain.domainxml import RUN_NAMESPACE
    from ..domain.render import render_run_marker

    try:
        domain.setMetadata(METADATA_ELEMENT, render_run_marker(time.time()), "tdxvirt-run",
                           RUN_NAMESPACE, AFFECT_LIVE)
    except libvirt_error_type():
        pass  # uptime is a convenience; a driver without live metadata shows '-'


def stop(conn, name, timeout: float = 120.0, poll: float = 0.5, progress=None) -> bool:
    """ACPI shutdown, then wait up to ``timeout`` seconds; False when it did not stop."""
    domain = lookup(conn, name)
    name = domain.name()  # the resolved name, for messages
    if not domain.isActive():
        return True
    try:
        domain.shutdown()
    except libvirt_error_type() as error:
        raise translate(error, f"cannot shut down {name!r}") from None
    started = time.monotonic()
    while domain.isActive():
        elapsed = time.monotonic() - started
        if elapsed >= timeout:
            return False
        if progress:
            progress(elapsed)
        time.sleep(poll)
    return True


def stop_or_destroy(conn, name, timeout: float = 120.0, force: bool = False,
                    progress=None) -> str:
    """``stop``, then with ``force`` ``destroy`` a TD that did not power off within
    ``timeout`` s: "stopped" (shut off, or already off) or "destroyed"; without
    ``force`` a TD still running is a LibvirtOperationError naming both ways to power
    it off (`tdxvirt stop`, the Ansible module tdx_td)."""
    domain = lookup(conn, name)
    if stop(conn, domain, timeout=timeout, progress=progress):
        return "stopped"
    if not force:
        from ..textsafe import quoted

        uuid = domain.UUIDString()
        raise LibvirtOperationError(
            f"{quoted(domain.name())} did not power off within {timeout:g} s; `tdxvirt stop {uuid} "
            f"--force` or `tdxvirt destroy {uuid}` powers it off at once")
    destroy(conn, domain)
    return "destroyed"


def destroy(conn, name) -> bool:
    """Power a TD off at once; False when it was not running."""
    domain = lookup(conn, name)
    name = domain.name()  # the resolved name, for messages
    if not domain.isActive():
        return False
    try:
        domain.destroy()
    except libvirt_error_type() as error:
        raise translate(error, f"cannot destroy {name!r}") from None
    return True


def reboot(conn, name) -> None:
    """Ask the guest to reboot. A TD cannot be reset: libvirt restarts its QEMU."""
    domain = lookup(conn, name)
    name = domain.name()  # the resolved name, for messages
    if not domain.isActive():
        raise LibvirtOperationError(f"{name!r} is not running; `tdxvirt start {name}` starts it")
    try:
        domain.reboot(0)
    except libvirt_error_type() as error:
        raise translate(error, f"cannot reboot {name!r}") from None


def undefine(conn, name, remove_storage: bool = False, config=None, dry_run: bool = False) -> list[str]:
    """Remove a stopped TD's definition; with remove_storage, the files tdxvirt made.

    Returns the files removed. A base image is never removed: only the overlay and
    the cloud-init seed tdxvirt created, and only when tdxvirt.domain.storage_paths accepts
    them (``config`` picks the storage directory, as for define; default: the config
    files). The paths are checked before libvirt's undefine: on a refusal nothing is
    deleted and the domain stays defined, so the user can fix it and run it again.
    """
    recover_interrupted(conn)
    domain = lookup(conn, name)
    name = domain.name()  # the resolved name, for messages
    if domain.isActive():
        raise LibvirtOperationError(
            f"{name!r} is running; stop it first (`tdxvirt stop {name}` or `tdxvirt destroy {name}`)"
        )
    if _saved(domain):
        raise LibvirtOperationError(
            f"{name!r} has a managed-save image, which libvirt will not undefine; remove it "
            f"first (`virsh managedsave-remove {name}`): a TD boots afresh, never from saved memory")
    xml = parsable_xml(domain.XMLDesc(0))  # unchanged unless libvirt wrote XML lxml refuses
    facts = read_facts(xml)
    has_nvram = "<nvram" in xml  # plain VMs get UEFI variables; TDs never do
    with _checked_storage(conn, domain, xml, facts, config, remove_storage) as storage:
        if dry_run:  # every check ran; nothing is undefined or deleted
            return [removal.path for removal in storage.removals]
        intent = _intend_undefine(conn, domain, storage)
        try:
            domain.undefineFlags(UNDEFINE_NVRAM) if has_nvram else domain.undefine()
        except libvirt_error_type() as error:
            answer = translate(error, f"cannot undefine {name!r}")
            if intent is not None and not isinstance(answer, LibvirtUnavailableError):
                journal.end(intent)  # refused: nothing happened; lost: the next run asks again
            raise answer from None
        _forget_record(conn, domain)
        removed = storage.remove()
        if intent is not None:
            journal.end(intent)
        return removed


def _intend_undefine(conn, domain, storage):
    """The intent (tdxvirt.lifecycle.journal) of an undefine that deletes files, written
    before libvirt forgets the domain; None when there is nothing to finish later."""
    if not storage.removals:
        return None
    return journal.begin(journal.Intent("undefine", conn.getURI(), domain.UUIDString().lower(),
                                        domain.name(), tuple(r.path for r in storage.removals),
                                        journal.this_process()))


def recover_interrupted(conn) -> list[str]:
    """Finish (or drop) what an interrupted tdxvirt left on this machine, before a
    command that could trip over it; nothing for a remote URI."""
    from ..virt.conn import is_remote

    if is_remote(conn.getURI()) or not journal.pending():
        return []
    return journal.recover()


def _forget_record(conn, domain) -> None:
    """The record goes with the domain: a later domain of the same UUID is a new one."""
    from ..domain.record import local_store
    from ..virt.conn import is_remote

    if not is_remote(conn.getURI()):
        local_store().remove(domain.UUIDString())


def _saved(domain) -> bool:
    try:
        return bool(domain.hasManagedSaveImage(0))
    except libvirt_error_type():
        return False


def _state_name(state_code: int, reason: int | None) -> str:
    """virsh's words, and "saved" for a shut-off domain with a managed-save image."""
    if state_code == SHUTOFF and reason == SHUTOFF_SAVED:
        return "saved"
    return STATE_NAMES.get(state_code, "unknown")


def _checked_storage(conn, domain, xml: str, facts: DomainFacts, config, remove_storage: bool):
    """The files undefine may delete, all checked now (issue #14: the XML is not trusted),
    by the host's facts: this machine's files for a local URI; none on another host."""
    from ..domain.record import TDRecord
    from ..facts import facts_for

    recorded = {}
    if remove_storage:
        # root's record names the storage define created; the metadata's paths (claims a
        # libvirt user can edit) only for a domain without one, and checked all the same
        record = record_of(conn, domain)
        source = record if isinstance(record, TDRecord) else facts
        recorded = {"overlay": source.overlay, "seed": source.seed}
    return facts_for(conn).storage_removal(domain.name(), xml, recorded, config)


def set_autostart(conn, name, enabled: bool) -> None:
    domain = lookup(conn, name)
    name = domain.name()  # the resolved name, for messages
    try:
        domain.setAutostart(1 if enabled else 0)
    except libvirt_error_type() as error:
        raise translate(error, f"cannot change autostart of {name!r}") from None


def domain_xml(conn, name, inactive: bool = False) -> str:
    return lookup(conn, name).XMLDesc(XML_INACTIVE if inactive else 0)


def _row(domain, state_code: int, xml: str, now: float, libvirt_version: int | None = None,
         reason: int | None = None, commandline_kept: bool = True, found=None,
         store=None, record=None) -> TDRow:
    """``found``: the integrity problems when the caller already has them, with the
    ``record`` they were judged by; else ``store``: the records to judge by (None: a
    remote host's, unknown here)."""
    from ..domain.integrity import problems

    root, facts = _parse(xml, domain.name())
    started = facts.started if state_code == 1 else None
    if found is None and store is not None:
        record = _stored(store, domain.UUIDString())
    if found is None:
        found = problems(root, libvirt_version=libvirt_version, commandline_kept=commandline_kept,
                         record=record) \
            if facts.managed_by_tdxvirt or facts.tdx or record is not None else ()
    return TDRow(facts, _state_name(state_code, reason),
                 None if started is None else max(0.0, now - started), tuple(map(str, found)),
                 recorded=record is not None)


def _builds_used(xml: str, uri: str) -> tuple[str, ...]:
    from ..build.artifacts import build_of
    from ..domain.domainxml import DomainXML
    from ..virt.conn import is_remote

    if is_remote(uri):
        return ()
    domain = DomainXML.of(xml)
    paths = [p for p in (domain.emulator(), domain.loader_path()) if p]
    found = (build_of(path) for path in paths)
    return tuple(build.describe() for build in found if build is not None)


def show(conn, name, host=None) -> TDInfo:
    """The TD and every problem: how it is no longer the TD defined (integrity), else
    what TDX's rules say of its XML (td_rules). ``host``: this machine's HostRoot or
    the host's facts, below which the recorded firmware, kernel and initrd are checked
    (None: they are not read)."""
    from ..domain.domainxml import DomainXML
    from ..domain.td_rules import td_problems

    domain = lookup(conn, name)
    xml = parsable_xml(domain.XMLDesc(0))  # every parser below gets XML lxml accepts
    state, reason = domain.state()[:2]
    inputs = integrity_inputs(conn, domain)
    if host is not None:
        inputs["files"] = recorded_files(conn, inputs["record"], host)
    from ..domain.integrity import problems as integrity_check

    found = [str(p) for p in integrity_check(xml, **inputs)]
    record = inputs["record"]
    row = _row(domain, state, xml, time.time(), reason=reason, found=found, record=record)
    from .assemble import all_gpu_holders

    parsed = DomainXML.of(xml)
    running = all_gpu_holders(conn, running_only=True) if row.facts.gpus else {}
    shared = [f"GPU {gpu} is also passed through by running domain(s) "
              f"{', '.join(repr(n) for n in others)}; only one domain can use it"
              for gpu in row.facts.gpus
              if (others := [n for n in running.get(gpu, []) if n != domain.name()])]
    return TDInfo(
        row=row,
        uuid=domain.UUIDString(),
        autostart=bool(domain.autostart()),
        persistent=bool(domain.isPersistent()),
        problems=tuple((found or td_problems(xml)) + shared),
        builds=_builds_used(xml, conn.getURI()),
        record=_record_state(record, conn),
        title=parsed.title,
        measurements=_measurements(record, row.facts),
        disks=tuple(parsed.disk_table()),
        interfaces=tuple(parsed.interface_table()),
        **_files_shown(record, inputs.get("files"), conn),
    )


def _files_shown(record, files, conn) -> dict:
    """TDInfo's ``files`` and ``files_note``: each recorded file with its state, or why
    none is checked here."""
    from ..domain.record import TDRecord
    from ..virt.conn import is_remote

    if is_remote(conn.getURI()):
        return {"files_note": "unknown here: the TD's host checks them against its own record at each start"}
    if not isinstance(record, TDRecord):
        return {"files_note": "none recorded (root's record holds them: `tdxvirt adopt`)"}
    if files is None:
        return {"files_note": "not checked"}
    shown = tuple(state.as_dict() for state in files)
    note = "" if record.loader else "firmware: libvirt's choice at each start (<os firmware='efi'>), no file to record"
    return {"files": shown, "files_note": note}


def _record_state(record, conn) -> str:
    from ..domain.record import TDRecord

    if isinstance(record, TDRecord):
        return "adopted" if record.adopted else "recorded"
    if record is not None:
        return f"untrustworthy: {record}"
    from ..virt.conn import is_remote

    return "none here (the host's own tdxvirt records it: `tdxvirt adopt`)" if is_remote(conn.getURI()) \
        else "none (judged by TDX's rules alone; `tdxvirt adopt` records it)"


def _measurements(record, facts) -> dict:
    """What define predicted: from root's record when there is one (the metadata copy is
    a libvirt user's to edit)."""
    from ..domain.record import TDRecord

    source = record if isinstance(record, TDRecord) else facts
    return {"mrtd": source.mrtd, "rtmr1": source.rtmr1, "rtmr2": source.rtmr2}


def list_tds(conn, include_foreign: bool = False) -> list[TDRow]:
    """tdxvirt's TDs (and, with include_foreign, every other TDX domain).

    One bulk call (getAllDomainStats lists every domain with its state) plus one
    XMLDesc per domain, however many attributes are shown.
    """
    rows = []
    now = time.time()
    listed = conn.getAllDomainStats(STATS_STATE)
    xmls = xmls_of_listed([domain for domain, _ in listed])  # reading starts now
    from ..domain.domainxml import read_domain_xml  # noqa: F401  (lxml loads while XML arrives)

    version, kept, store = conn.getLibVersion(), _keeps_commandline(conn), record_store(conn)
    for (domain, stats), xml in zip(listed, xmls):
        if xml is None:
            continue
        row = _row(domain, stats.get("state.state", 0), xml, now, version,
                   stats.get("state.reason"), kept, store=store)
        if row.facts.managed_by_tdxvirt or row.recorded or (include_foreign and row.facts.tdx):
            rows.append(row)
    return sorted(rows, key=lambda row: row.facts.name)
