"""Defining and driving TDs through the libvirt API.

Functions take an open libvirt connection and raise tdxvirt errors; they print
nothing. The CLI is a thin layer over them.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass

from .conn import libvirt_error_type, translate
from .errors import InputError, LibvirtOperationError, NotFoundError
from .assemble import AssembledTD, assemble_td, gpu_holders  # noqa: F401  (re-exported)
from .host import HostRoot
from .metadata import DomainFacts, read_domain_xml
from .policy import Disk
from .spec import TDSpec

# virDomainDefineFlags VIR_DOMAIN_DEFINE_VALIDATE: without it libvirt silently drops
# unknown elements (and accepts a relative quote-service path).
DEFINE_VALIDATE = 1
# virDomainState values, as virsh names them.
STATE_NAMES = {0: "no state", 1: "running", 2: "blocked", 3: "paused", 4: "shutting down",
               5: "shut off", 6: "crashed", 7: "suspended"}
STATS_STATE = 1  # VIR_DOMAIN_STATS_STATE


@dataclass(frozen=True)
class TDRow:
    facts: DomainFacts
    state: str


def lookup(conn, name: str):
    """A domain by name or UUID, as virsh looks them up."""
    libvirt_error = libvirt_error_type()
    for finder in (conn.lookupByName, conn.lookupByUUIDString):
        try:
            return finder(name)
        except libvirt_error:
            continue
    raise NotFoundError(
        f"no domain named {name!r} at {conn.getURI()}; `tdxvirt list --all` shows the TDs there"
    )


def _exists(conn, name: str) -> bool:
    try:
        conn.lookupByName(name)
        return True
    except libvirt_error_type():
        return False


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


def define_td(conn, host: HostRoot, spec: TDSpec, config=None) -> AssembledTD:
    """Define the TD; on any failure nothing is left behind (no domain, no overlay)."""
    if _exists(conn, spec.name):
        raise InputError(
            f"a domain named {spec.name!r} already exists at {conn.getURI()}; "
            "choose another name or `tdxvirt undefine` it first"
        )
    td = assemble_td(conn, host, spec, config)
    overlay = td.plan.disk if td.plan.disk and td.plan.disk.overlay_base else None
    if overlay:
        _create_overlay(overlay)
    try:
        conn.defineXMLFlags(td.xml, DEFINE_VALIDATE)
    except libvirt_error_type() as error:
        if overlay:
            os.unlink(overlay.path)
        raise translate(error, f"libvirt refused to define {spec.name!r}") from None
    return td


def _state(domain) -> int:
    return domain.state()[0]


def start(conn, name: str) -> bool:
    """Start a TD; False when it was already running."""
    domain = lookup(conn, name)
    if domain.isActive():
        return False
    try:
        domain.create()
    except libvirt_error_type() as error:
        raise translate(error, f"cannot start {name!r}") from None
    return True


def stop(conn, name: str, timeout: float = 120.0, poll: float = 0.5) -> bool:
    """ACPI shutdown, then wait up to ``timeout`` seconds; False when it did not stop."""
    domain = lookup(conn, name)
    if not domain.isActive():
        return True
    try:
        domain.shutdown()
    except libvirt_error_type() as error:
        raise translate(error, f"cannot shut down {name!r}") from None
    deadline = time.monotonic() + timeout
    while domain.isActive():
        if time.monotonic() >= deadline:
            return False
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


def undefine(conn, name: str) -> None:
    domain = lookup(conn, name)
    if domain.isActive():
        raise LibvirtOperationError(
            f"{name!r} is running; stop it first (`tdxvirt stop {name}` or `tdxvirt destroy {name}`)"
        )
    try:
        domain.undefine()
    except libvirt_error_type() as error:
        raise translate(error, f"cannot undefine {name!r}") from None


def list_tds(conn, include_foreign: bool = False) -> list[TDRow]:
    """tdxvirt's TDs (and, with include_foreign, every other TDX domain).

    One bulk call (getAllDomainStats lists every domain with its state) plus one
    XMLDesc per domain, however many attributes are shown.
    """
    rows = []
    for domain, stats in conn.getAllDomainStats(STATS_STATE):
        facts = read_domain_xml(domain.XMLDesc(0))
        if facts.managed_by_tdxvirt or (include_foreign and facts.tdx):
            rows.append(TDRow(facts, STATE_NAMES.get(stats.get("state.state"), "unknown")))
    return sorted(rows, key=lambda row: row.facts.name)
