"""Memory sizes as users type them: ``32G``, ``16384M``, ``1T``, plain MiB."""

from __future__ import annotations

import re

from .errors import InputError

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

_SUFFIX = {"": MIB, "K": KIB, "M": MIB, "G": GIB, "T": 1024 * GIB}
_SIZE = re.compile(r"(?P<number>[0-9]+)\s*(?P<unit>[KMGT]?)(?:I?B)?", re.IGNORECASE)

# A bound far above any real host, so absurd values fail here, not in libvirt.
MAX_BYTES = 64 * 1024 * GIB


def parse_size(text: str, what: str = "size") -> int:
    """Return bytes. A bare number is MiB, like virt-install's ``--memory``."""
    match = _SIZE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise InputError(
            f"invalid {what} {text!r}: use a whole number with an optional unit "
            "K, M, G or T (e.g. 32G); a bare number means MiB"
        )
    size = int(match["number"]) * _SUFFIX[match["unit"].upper()]
    if size <= 0:
        raise InputError(f"invalid {what} {text!r}: it must be larger than 0")
    if size > MAX_BYTES:
        raise InputError(f"invalid {what} {text!r}: larger than 64 TiB")
    return size


def human(size: int) -> str:
    """Shortest exact rendering: 34359738368 -> '32G'."""
    for unit, factor in (("T", 1024 * GIB), ("G", GIB), ("M", MIB), ("K", KIB)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"
