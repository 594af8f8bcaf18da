"""What tdxvirt's libvirt qemu hook decides, inside the daemon, for one call.

libvirt runs ``/etc/libvirt/hooks/qemu.d/tdxvirt NAME OPERATION SUBOPERATION EXTRA``
with the domain's full XML on stdin, and a non-zero exit with a line on stderr stops
the operation; that line reaches virsh and virt-manager's error dialog. The hook must
not call libvirt's API (the daemon waits for it), so everything comes from the XML,
root's TD records and libvirt's own root-owned snapshot metadata:

- ``prepare begin`` (every start: virsh, virt-manager's Run, autostart, a snapshot
  revert): the integrity check (tdxvirt.domain.integrity) against the record, with the
  recorded firmware, kernel and initrd against the files at their paths on this host
  (tdxvirt.domain.recordfiles), and no snapshot with memory;
- ``restore begin`` (a managed save or ``virsh restore``) and ``migrate begin``:
  refused for a TD: it must boot afresh and measured, here;
- everything else, and every domain that is neither recorded nor a TD: allowed.

A recorded TD fails closed: an unreadable record or any error here refuses it.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from ..domain.record import RecordError, RecordStore

# libvirt's qemu driver keeps each domain's snapshot metadata here (root's, 0700)
SNAPSHOT_DIR = "/var/lib/libvirt/qemu/snapshot"
_SNAPSHOT_LIMIT = 1 << 20  # one snapshot's XML
_SNAPSHOTS_MAX = 256  # more than this: refuse rather than read on


def decide(name: str, operation: str, suboperation: str, xml: bytes, store: RecordStore,
           snapshot_dir: str = SNAPSHOT_DIR) -> str | None:
    """The one line refusing this call, or None to let it go on."""
    if suboperation != "begin" or operation not in ("prepare", "restore", "migrate"):
        return None
    from lxml import etree

    from ..domain.domainxml import DomainXML
    from ..domain.integrity import intended_tdx, problems

    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
    try:
        root = etree.fromstring(xml, parser)
    except etree.XMLSyntaxError as error:
        return f"tdxvirt: cannot read the definition of {name!r} ({error}); not started"
    domain = DomainXML(root)
    try:
        record = store.read(domain.uuid or "")
    except RecordError as error:
        record = error
    if record is None and not intended_tdx(root):
        return None  # neither recorded nor a TD: an ordinary VM
    quoted = shlex.quote(name)
    if operation == "restore":
        return (f"tdxvirt: {name!r} is an Intel TDX trust domain and is never resumed from saved "
                f"memory: it boots afresh and measured; remove the saved image "
                f"(`virsh managedsave-remove {quoted}`) and start it again")
    if operation == "migrate":
        return f"tdxvirt: {name!r} is an Intel TDX trust domain, which tdxvirt does not migrate"
    snapshots, unreadable = memory_snapshots(Path(snapshot_dir) / name)
    if unreadable:
        return f"tdxvirt: {unreadable}; {name!r} was not started"
    found = problems(domain, record=record, memory_snapshots=snapshots, files=recorded_files(record))
    if found:
        first, more = found[0], len(found) - 1
        extra = f" (and {more} more: `tdxvirt show {quoted}`)" if more else ""
        # The way back before the detail: virt-manager's error dialog cuts libvirt's
        # message (its own prefix included) at 512 characters.
        return (f"tdxvirt: {name!r} is no longer the TD it was defined as; {first.fix}{extra}; "
                f"what changed: {first.what}")
    modes = gpu_mode_problems([bdf for bdf, _ in domain.pci_hostdevs()])
    if modes:
        more = f" (and {len(modes) - 1} more)" if len(modes) > 1 else ""
        return f"tdxvirt: {name!r} would not start safely: {modes[0]}{more}"
    return None


def recorded_files(record) -> tuple:
    """The files root's record names against those at their paths here, as the daemon
    sees them: the hook runs on the TD's own host, so these are the files QEMU will load
    (tdxvirt.domain.recordfiles; each read bounded, a FIFO refused without waiting)."""
    from ..domain.record import TDRecord
    from ..domain.recordfiles import ENFORCED, check

    return check(record, fields=ENFORCED) if isinstance(record, TDRecord) else ()


TOOL_TIMEOUT = 15.0  # seconds for each run of NVIDIA's tool: the daemon waits for the hook


def gpu_mode_problems(addresses: list[str]) -> list[str]:
    """The GPUs' CC / PPCIe modes against a TD's start, read through NVIDIA's tool on
    this host (``$TDXVIRT_GPU_TOOLS`` or the module installed beside tdxvirt), each run
    bounded; nothing when the tool is not installed (the modes are then unknown here:
    tdxvirt's own `start` and the GPU's attestation still check them)."""
    if not addresses:
        return []
    from ..errors import TdxvirtError
    from ..gpu.ccmode import mode_problems
    from ..gpu.modes import mode_reader
    from ..host import HostRoot
    from ..host.pci import read_device

    host = HostRoot("/")
    try:
        read = mode_reader(host, timeout=TOOL_TIMEOUT)
    except TdxvirtError as error:  # an untrusted tool: refused, never silently skipped
        return [str(error)]
    if read is None:
        return []
    return mode_problems(lambda address: read_device(host, address), addresses, True, read)


def memory_snapshots(directory: Path) -> tuple[tuple[str, ...], str | None]:
    """The snapshots in libvirt's metadata directory of one domain that hold memory,
    and a reason when they cannot be read (bounded: regular files, each capped)."""
    from lxml import etree

    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except FileNotFoundError:
        return (), None
    except OSError as error:
        return (), f"cannot read the snapshot metadata in {directory} ({error.strerror})"
    xml_files = [e for e in entries if e.name.endswith(".xml")]
    if len(xml_files) > _SNAPSHOTS_MAX:
        return (), f"{directory} holds more than {_SNAPSHOTS_MAX} snapshots"
    found = []
    for entry in xml_files:
        data = _bounded(entry.path)
        if data is None:
            return (), f"the snapshot metadata {entry.path} is not a readable regular file"
        try:
            root = etree.fromstring(data, etree.XMLParser(resolve_entities=False, no_network=True))
        except etree.XMLSyntaxError:
            return (), f"the snapshot metadata {entry.path} is not XML"
        memory = root.find("memory")
        state = root.findtext("state")
        if memory is not None and memory.get("snapshot", "no") != "no" or \
                memory is None and state in ("running", "paused", "pmsuspended"):
            found.append(root.findtext("name") or entry.name[:-4])
    return tuple(found), None


def _bounded(path: str) -> bytes | None:
    """A regular file of at most _SNAPSHOT_LIMIT bytes (tdxvirt.userfile), else None."""
    from ..errors import TdxvirtError
    from ..userfile import read_user_file

    try:
        return read_user_file(path, "snapshot metadata", limit=_SNAPSHOT_LIMIT)
    except TdxvirtError:
        return None
