"""Finding the domain a user named, as virsh does, and reading its XML safely.

Below everything that acts on domains (tdxvirt.lifecycle.tds, guest, attest): a lookup needs
only the libvirt connection.
"""

from __future__ import annotations

from ..errors import InputError, NotFoundError
from .conn import libvirt_error_type, translate


def _absent(error) -> bool:
    """True when libvirt said the domain does not exist (not: the connection broke)."""
    import libvirt

    return error.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_INVALID_ARG)


def lookup(conn, name: str):
    """A domain by ID, UUID or name, tried in virsh's order (vshLookupDomainInternal:
    ID, then UUID, then name).

    libvirt lets a domain be *named* like another domain's UUID, or like a number. An
    argument that matches different domains by different keys is refused (virsh would
    silently take the first match; root must not be steered to another domain by a
    name someone else chose). Callers act on the returned domain object, and hand
    its UUID, never the raw argument, to anything that looks it up again.
    """
    if not isinstance(name, str):
        return name  # already a domain object (the CLI resolves once, then acts on it)
    from ..textsafe import safe

    libvirt_error = libvirt_error_type()
    finders = []
    if name.isascii() and name.isdigit() and len(name) < 10:
        finders.append(("ID", lambda text: conn.lookupByID(int(text))))
    finders += [("UUID", conn.lookupByUUIDString), ("name", conn.lookupByName)]
    found = []
    for key, finder in finders:
        try:
            found.append((key, finder(name)))
        except libvirt_error as error:
            if not _absent(error):
                raise translate(error, f"cannot look up {name!r}") from None
    if not found:
        raise NotFoundError(
            f"no domain named {name!r} (nor with that ID or UUID) at {conn.getURI()}; "
            "`tdxvirt list --foreign` shows the TDs there"
        )
    distinct: dict[str, tuple[str, object]] = {}
    for key, domain in found:
        distinct.setdefault(domain.UUIDString(), (key, domain))
    if len(distinct) > 1:
        matches = "; ".join(f"by {key} it is '{safe(domain.name())}' (UUID {uuid})"
                            for uuid, (key, domain) in distinct.items())
        raise InputError(
            f"{name!r} matches different domains: {matches}; refusing to guess: name the "
            "domain you mean by another of its handles (its UUID or name as shown here)"
        )
    return found[0][1]


def resolved(domain) -> str:
    """'name' (UUID ...) of a resolved domain, terminal-safe: what destructive commands
    echo, so the user sees which domain was acted on."""
    from ..textsafe import quoted

    return f"{quoted(domain.name())} (UUID {domain.UUIDString()})"


def parsable_xml(xml: str) -> str:
    """A domain's XML as lxml can read it: libvirt writes some characters XML forbids
    (an ESC in a name given to virDomainRename) raw into it; those become U+FFFD. The
    same text when there is none."""
    from ..textsafe import xml_parsable

    return xml_parsable(xml)
