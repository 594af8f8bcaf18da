"""The guest OS a domain declares to management tools, in libosinfo's terms.

virt-manager reads ``<libosinfo:os id=...>`` from a domain's metadata to name the OS on
its Overview page and to choose device defaults in Add Hardware (virtio for a recent
Linux; SATA and e1000e for "Generic or unknown OS"). A TD's guest is a Linux recent
enough to run as a TDX guest, so ``define`` declares libosinfo's generic "Linux 2022"
unless the user names another OS with ``--os-variant`` (virt-install's spelling),
which is looked up in the osinfo database on this machine (osinfo-db: the catalogue
virt-manager and virt-install read; a short id it does not know is refused, as
virt-install refuses it).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import InputError

NAMESPACE = "http://libosinfo.org/xmlns/libvirt/domain/1.0"
DEFAULT_OS = "http://libosinfo.org/linux/2022"  # in osinfo-db since 2022 (Debian 12 and 13)
DATABASES = ("/usr/share/osinfo", "/etc/osinfo")  # osinfo-db's system and local folders
_SHORT_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_FILE_LIMIT = 1 << 20


def os_id(short_id: str, databases=DATABASES) -> str:
    """The libosinfo id (a URI) of ``short_id`` (e.g. ubuntu22.04, linux2022)."""
    if not _SHORT_ID.fullmatch(short_id):
        raise InputError(f"invalid --os-variant {short_id!r}: a libosinfo short id such as "
                         "ubuntu22.04 or linux2022 (`osinfo-query os` lists them)")
    files = [path for base in databases for path in sorted(Path(base).glob("os/*/*.xml"))]
    if not files:
        raise InputError("--os-variant needs the osinfo database, which is not installed here "
                         "(Debian: apt install osinfo-db); or leave --os-variant out")
    wanted = f"<short-id>{short_id}</short-id>".encode()
    for path in files:
        try:
            with open(path, "rb") as handle:
                data = handle.read(_FILE_LIMIT)
        except OSError:
            continue
        if wanted in data:
            found = _id_of(data, short_id)
            if found:
                return found
    raise InputError(f"unknown --os-variant {short_id!r}: this machine's osinfo database "
                     f"does not know it; `osinfo-query os` lists what it knows (a newer "
                     f"osinfo-db knows newer systems), or use the generic linux2022")


def _id_of(data: bytes, short_id: str) -> str | None:
    from lxml import etree

    try:
        root = etree.fromstring(data, etree.XMLParser(resolve_entities=False, no_network=True))
    except etree.XMLSyntaxError:
        return None
    for system in root.iter("os"):
        if short_id in (s.text for s in system.findall("short-id")) and system.get("id"):
            return system.get("id")
    return None
