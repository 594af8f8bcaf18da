"""``tdxvirt adopt``: root takes a TD it has no record of (another tool's, a clone, an
older tdxvirt's, a domain whose GPUs changed on purpose) under its record, after
showing what will be recorded. From then on the domain is judged against that record
(tdxvirt.domain.record), inside libvirt's hook too.

Only a domain that passes TDX's rules as it is can be adopted: a weakened one is
repaired first (``tdxvirt repair``), so adopting never blesses a weakening. The
domain's own XML is read once, as root, and copied into root's record: from then on
nothing a libvirt user edits in it changes the reference. The firmware, kernel and
initrd are digested again from the files at their paths (tdxvirt.domain.recordfiles):
adopting is also how root accepts a replaced file after checking it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import HostNotReadyError, InputError

# What adopting accepts as it is: the very things adopt exists for.
_ACCEPTED = {"clone", "gpu-removed", "record"}


@dataclass(frozen=True)
class Adoption:
    name: str
    record: object  # tdxvirt.domain.record.TDRecord
    replaces: bool  # a record was there (damaged, or of the same TD)
    # the fields (loader, kernel, initrd) whose recorded digest this changes
    redigested: tuple[str, ...] = ()


def adopt_td(conn, name, *, dry_run: bool = False, host=None) -> Adoption:
    """``host``: this machine's HostRoot (or its facts) the TD's files are read below."""
    from ..domain.domainxml import DomainXML
    from ..domain.integrity import intended_tdx, problems
    from ..domain.recorded import record_from
    from ..virt.conn import is_remote
    from . import tds

    domain = tds.lookup(conn, name)
    name = domain.name()
    if is_remote(conn.getURI()):
        raise InputError(f"{name!r} runs on another host, whose libvirt hook reads only that host's "
                         f"records; run `tdxvirt adopt {name}` on that host")
    xml = tds.parsable_xml(domain.XMLDesc(tds.XML_INACTIVE))
    parsed = DomainXML.of(xml)
    if not intended_tdx(parsed.root):
        raise InputError(f"{name!r} is not a TD (no TDX launch security or tdx-guest object): "
                         "there is nothing to record")
    inputs = tds.integrity_inputs(conn, domain)
    store = tds.record_store(conn)
    current = inputs.pop("record")
    found = [p for p in problems(parsed, **inputs) if p.kind not in _ACCEPTED]
    if found:
        first, more = found[0], len(found) - 1
        extra = f" (and {more} more)" if more else ""
        raise HostNotReadyError(f"{name!r} is not adopted while it breaks TDX's rules: {first.what}{extra}; "
                                f"`tdxvirt repair {name}` first; nothing was recorded")
    from .assemble import all_gpu_holders

    holders = all_gpu_holders(conn)
    for bdf, _ in parsed.pci_hostdevs():
        others = [n for n in holders.get(bdf, []) if n != name]
        if others:
            raise HostNotReadyError(f"GPU {bdf} of {name!r} is also passed through by "
                                    f"{', '.join(map(repr, others))}: give {name!r} a GPU of its own "
                                    "(`virt-xml NAME --remove-device --hostdev BDF`, then add another); "
                                    "nothing was recorded")
    from ..domain.record import TDRecord
    from ..facts import facts_for
    from ..filedigest import DigestError

    try:
        record = record_from(parsed, domain.UUIDString(), adopted=True,
                             host_path=facts_for(conn, host).host.path)
    except DigestError as error:
        raise HostNotReadyError(f"{name!r} is not adopted: {error}; put the file back (or point the "
                                f"TD at one that is there), then adopt it; nothing was recorded") from None
    replaces = current is not None
    before = current.digests if isinstance(current, TDRecord) else {}
    redigested = tuple(field for field, value in record.digests.items()
                       if field in before and before[field] != value)
    if not dry_run:
        try:
            store.write(record)
        except OSError as error:
            raise HostNotReadyError(f"cannot write the TD record of {name!r} ({error.strerror}); "
                                    "nothing was recorded") from None
    return Adoption(name, record, replaces, redigested)
