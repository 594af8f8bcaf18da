"""Defining and driving TDs through the libvirt API.

Functions take an open libvirt connection and raise tdxvirt errors; they print
nothing. The CLI is a thin layer over them.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass

from typing import TYPE_CHECKING

from . import locks
from .conn import libvirt_error_type, translate, xmls_of_listed
from .errors import HostNotReadyError, InputError, LibvirtOperationError, NotFoundError

if TYPE_CHECKING:  # rendering, planning and XML reading (lxml) are imported only by the
    # functions that use them: `list` starts reading domains before lxml is loaded
    from .assemble import AssembledTD
    from .host import HostRoot
    from .metadata import DomainFacts
    from .policy import Disk
    from .spec import TDSpec


# virDomainDefineFlags VIR_DOMAIN_DEFINE_VALIDATE: without it libvirt silently drops
# unknown elements (and accepts a relative quote-service path).
DEFINE_VALIDATE = 1
# virDomainState values, as virsh names them.
STATE_NAMES = {0: "no state", 1: "running", 2: "blocked", 3: "paused", 4: "shutting down",
               5: "shut off", 6: "crashed", 7: "suspended"}
STATS_STATE = 1  # VIR_DOMAIN_STATS_STATE
UNDEFINE_NVRAM = 4  # VIR_DOMAIN_UNDEFINE_NVRAM
METADATA_ELEMENT, AFFECT_LIVE = 2, 1  # VIR_DOMAIN_METADATA_ELEMENT, VIR_DOMAIN_AFFECT_LIVE


@dataclass(frozen=True)
class TDRow:
    facts: DomainFacts
    state: str
    uptime: float | None = None  # seconds, when tdxvirt started it


@dataclass(frozen=True)
class TDInfo:
    row: TDRow
    uuid: str
    autostart: bool
    persistent: bool
    problems: tuple[str, ...]
    builds: tuple[str, ...]  # the `tdxvirt build` results its emulator and firmware come from


def _absent(error) -> bool:
    """True when libvirt said the domain does not exist (not: the connection broke)."""
    import libvirt

    return error.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_INVALID_ARG)


def lookup(conn, name: str):
    """A domain by name, UUID or (running) ID, as virsh looks them up."""
    libvirt_error = libvirt_error_type()
    finders = [conn.lookupByName, conn.lookupByUUIDString]
    if name.isascii() and name.isdigit() and len(name) < 10:
        finders.append(lambda text: conn.lookupByID(int(text)))
    for finder in finders:
        try:
            return finder(name)
        except libvirt_error as error:
            if not _absent(error):
                raise translate(error, f"cannot look up {name!r}") from None
    raise NotFoundError(
        f"no domain named {name!r} at {conn.getURI()}; `tdxvirt list --all` shows the TDs there"
    )


def _exists(conn, name: str) -> bool:
    try:
        conn.lookupByName(name)
        return True
    except libvirt_error_type() as error:
        if _absent(error):
            return False
        raise translate(error, f"cannot look up {name!r}") from None


def _create_overlay(disk: Disk) -> None:
    """A qcow2 overlay on the base image; the base is only ever read."""
    if os.path.lexists(disk.path):
        raise InputError(f"{disk.path} already exists; remove it or choose another TD name")
    os.makedirs(os.path.dirname(disk.path), exist_ok=True)
    result = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", disk.base_format, "-b",
         disk.overlay_base, disk.path], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LibvirtOperationError(
            f"qemu-img could not create the overlay {disk.path}: "
            f"{' '.join(result.stderr.split()) or 'exit ' + str(result.returncode)}")


def assemble_td(conn, host: HostRoot, spec: TDSpec, config=None) -> AssembledTD:
    from .assemble import assemble_td as assemble

    return assemble(conn, host, spec, config)


def gpu_holders(conn) -> dict[str, str]:
    from .assemble import gpu_holders as holders

    return holders(conn)


def define_td(conn, host: HostRoot, spec: TDSpec, config=None) -> AssembledTD:
    """Define the TD; on any failure nothing is left behind (no domain, no overlay).

    The name and the GPUs are locked from the checks to the define, so a second
    tdxvirt asking for either waits, then sees the first one's domain.
    """
    with locks.held([locks.name_key(spec.name), *locks.gpu_keys(spec.gpus)]):
        if _exists(conn, spec.name):
            raise InputError(
                f"a domain named {spec.name!r} already exists at {conn.getURI()}; "
                "choose another name or `tdxvirt undefine` it first"
            )
        td = assemble_td(conn, host, spec, config)
        overlay = td.plan.disk if td.plan.disk and td.plan.disk.overlay_base else None
        created = []
        try:
            if overlay:
                _create_overlay(overlay)
                created.append(overlay.path)
            if td.plan.seed:
                _create_seed(spec, td.plan.seed)
                created.append(td.plan.seed)
            conn.defineXMLFlags(td.xml, DEFINE_VALIDATE)
        except libvirt_error_type() as error:
            _remove(created)
            raise translate(error, f"libvirt refused to define {spec.name!r}") from None
        except BaseException:
            _remove(created)
            raise
    return td


def _create_seed(spec: TDSpec, path: str) -> None:
    from .guest.seed import build_seed_iso
    from .guest.userdata import hostname_for

    if os.path.lexists(path):
        raise InputError(f"{path} already exists; remove it or choose another TD name")
    build_seed_iso(path, hostname=hostname_for(spec.name), ssh_keys=spec.ssh_keys,
                   user_data=spec.user_data)


def _remove(paths: list[str]) -> None:
    """Undo what a failed define created, newest first."""
    for path in reversed(paths):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def start(conn, host: HostRoot, name: str, skip_preflight: bool = False,
          read_modes=None) -> bool:
    """Start a TD after a preflight; False when it was already running.

    ``read_modes`` reads the GPUs' CC / PPCIe modes (preflight.mode_reader); None
    leaves them unchecked."""
    domain = lookup(conn, name)
    if domain.isActive():
        return False
    from .metadata import read_domain_xml

    xml = domain.XMLDesc(0)
    with locks.held(locks.gpu_keys(read_domain_xml(xml).gpus)):
        if not skip_preflight:
            from .preflight import start_problems

            problems = start_problems(conn, host, xml, read_modes)
            if problems:
                more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
                raise HostNotReadyError(f"{domain.name()!r} would not start safely: "
                                        f"{problems[0]}{more}; --skip-preflight overrides")
        try:
            domain.create()
        except libvirt_error_type() as error:
            raise translate(error, f"cannot start {name!r}") from None
    _mark_started(domain)
    return True


def _mark_started(domain) -> None:
    """Live-only metadata with the start time, so list can show uptime."""
    from .metadata import RUN_NAMESPACE
    from .render import render_run_marker

    try:
        domain.setMetadata(METADATA_ELEMENT, render_run_marker(time.time()), "tdxvirt-run",
                           RUN_NAMESPACE, AFFECT_LIVE)
    except libvirt_error_type():
        pass  # uptime is a convenience; a driver without live metadata shows '-'


def stop(conn, name: str, timeout: float = 120.0, poll: float = 0.5, progress=None) -> bool:
    """ACPI shutdown, then wait up to ``timeout`` seconds; False when it did not stop."""
    domain = lookup(conn, name)
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


def destroy(conn, name: str) -> bool:
    """Power a TD off at once; False when it was not running."""
    domain = lookup(conn, name)
    if not domain.isActive():
        return False
    try:
        domain.destroy()
    except libvirt_error_type() as error:
        raise translate(error, f"cannot destroy {name!r}") from None
    return True


def reboot(conn, name: str) -> None:
    """Ask the guest to reboot. A TD cannot be reset: libvirt restarts its QEMU."""
    domain = lookup(conn, name)
    if not domain.isActive():
        raise LibvirtOperationError(f"{name!r} is not running; `tdxvirt start {name}` starts it")
    try:
        domain.reboot(0)
    except libvirt_error_type() as error:
        raise translate(error, f"cannot reboot {name!r}") from None


def undefine(conn, name: str, remove_storage: bool = False, config=None) -> list[str]:
    """Remove a stopped TD's definition; with remove_storage, the files tdxvirt made.

    Returns the files removed. A base image is never removed: only the overlay and
    the cloud-init seed tdxvirt created, and only when tdxvirt.storage_paths accepts
    them (``config`` picks the storage directory, as for define; default: the config
    files). The paths are checked before libvirt's undefine: on a refusal nothing is
    deleted and the domain stays defined, so the user can fix it and run it again.
    """
    domain = lookup(conn, name)
    if domain.isActive():
        raise LibvirtOperationError(
            f"{name!r} is running; stop it first (`tdxvirt stop {name}` or `tdxvirt destroy {name}`)"
        )
    from .metadata import read_domain_xml

    xml = domain.XMLDesc(0)
    facts = read_domain_xml(xml)
    has_nvram = "<nvram" in xml  # plain VMs get UEFI variables; TDs never do
    with _checked_storage(conn, domain.name(), xml, facts, config, remove_storage) as storage:
        try:
            domain.undefineFlags(UNDEFINE_NVRAM) if has_nvram else domain.undefine()
        except libvirt_error_type() as error:
            raise translate(error, f"cannot undefine {name!r}") from None
        return storage.remove()


def _checked_storage(conn, name: str, xml: str, facts: DomainFacts, config, remove_storage: bool):
    """The files undefine may delete, all checked now (issue #14: the XML is not trusted)."""
    from .storage_paths import StorageRemoval

    recorded = {"overlay": facts.overlay, "seed": facts.seed} if remove_storage else {}
    return StorageRemoval(name, xml, conn.getURI(), recorded, config)


def set_autostart(conn, name: str, enabled: bool) -> None:
    domain = lookup(conn, name)
    try:
        domain.setAutostart(1 if enabled else 0)
    except libvirt_error_type() as error:
        raise translate(error, f"cannot change autostart of {name!r}") from None


def domain_xml(conn, name: str, inactive: bool = False) -> str:
    return lookup(conn, name).XMLDesc(2 if inactive else 0)  # VIR_DOMAIN_XML_INACTIVE


def _row(domain, state_code: int, xml: str, now: float) -> TDRow:
    from .metadata import read_domain_xml

    facts = read_domain_xml(xml)
    started = facts.started if state_code == 1 else None
    return TDRow(facts, STATE_NAMES.get(state_code, "unknown"),
                 None if started is None else max(0.0, now - started))


def _builds_used(xml: str, uri: str) -> tuple[str, ...]:
    from lxml import etree

    from .build.artifacts import build_of
    from .conn import is_remote

    if is_remote(uri):
        return ()
    root = etree.fromstring(xml.encode())
    paths = [p.strip() for p in (root.findtext("devices/emulator"), root.findtext("os/loader")) if p]
    found = (build_of(path) for path in paths)
    return tuple(build.describe() for build in found if build is not None)


def show(conn, name: str) -> TDInfo:
    from .td_rules import td_problems

    domain = lookup(conn, name)
    xml = domain.XMLDesc(0)
    return TDInfo(
        row=_row(domain, domain.state()[0], xml, time.time()),
        uuid=domain.UUIDString(),
        autostart=bool(domain.autostart()),
        persistent=bool(domain.isPersistent()),
        problems=tuple(td_problems(xml)),
        builds=_builds_used(xml, conn.getURI()),
    )


def list_tds(conn, include_foreign: bool = False) -> list[TDRow]:
    """tdxvirt's TDs (and, with include_foreign, every other TDX domain).

    One bulk call (getAllDomainStats lists every domain with its state) plus one
    XMLDesc per domain, however many attributes are shown.
    """
    rows = []
    now = time.time()
    listed = conn.getAllDomainStats(STATS_STATE)
    xmls = xmls_of_listed([domain for domain, _ in listed])  # reading starts now
    from .metadata import read_domain_xml  # noqa: F401  (lxml loads while XML arrives)

    for (domain, stats), xml in zip(listed, xmls):
        if xml is None:
            continue
        row = _row(domain, stats.get("state.state", 0), xml, now)
        if row.facts.managed_by_tdxvirt or (include_foreign and row.facts.tdx):
            rows.append(row)
    return sorted(rows, key=lambda row: row.facts.name)
