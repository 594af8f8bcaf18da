"""TDX launch options as users type them: policy, measurements, quote service."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from ..errors import InputError

POLICY_DEBUG = 1 << 0
POLICY_SEPT_VE_DISABLE = 1 << 28
# libvirt's qemu driver accepts no other TD attribute bits.
POLICY_ALLOWED = POLICY_DEBUG | POLICY_SEPT_VE_DISABLE
MEASUREMENT_BYTES = 48  # SHA-384
_VSOCK = re.compile(r"vsock:(?P<cid>[0-9]+):(?P<port>[0-9]+)")


def parse_policy(text: str) -> int:
    """A hex policy (``0x10000000``; libvirt reads it as hex even without 0x)."""
    try:
        policy = int(text.strip().removeprefix("0x").removeprefix("0X"), 16)
    except (ValueError, AttributeError):
        raise InputError(f"invalid --policy {text!r}: give a hex number such as 0x10000000") from None
    if policy < 0 or policy & ~POLICY_ALLOWED:
        raise InputError(
            f"invalid --policy {text!r}: only bit 0 (debug, 0x1) and bit 28 (SEPT #VE "
            "disable, 0x10000000) are allowed by libvirt"
        )
    return policy


def parse_measurement(text: str, option: str) -> str:
    """Base64 of exactly 48 bytes (a SHA-384), returned in canonical base64."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError, AttributeError):
        raise InputError(f"invalid {option}: not base64; give base64 of a 48-byte SHA-384 value") from None
    if len(raw) != MEASUREMENT_BYTES:
        raise InputError(
            f"invalid {option}: decodes to {len(raw)} bytes, not 48; give base64 of a "
            "SHA-384 value (e.g. `sha384sum`'s digest, base64-encoded)"
        )
    return base64.b64encode(raw).decode()


@dataclass(frozen=True)
class QuoteService:
    """Where the TD asks for quotes: a unix socket path, or a vsock CID and port."""

    path: str | None = None
    cid: int | None = None
    port: int | None = None

    @property
    def is_vsock(self) -> bool:
        return self.path is None


def parse_qgs(text: str) -> QuoteService:
    text = text.strip() if isinstance(text, str) else ""
    match = _VSOCK.fullmatch(text)
    if match:
        cid, port = int(match["cid"]), int(match["port"])
        if cid > 0xFFFFFFFF or port > 0xFFFFFFFF:
            raise InputError(f"invalid --qgs {text!r}: CID and port must fit in 32 bits")
        return QuoteService(cid=cid, port=port)
    if text.startswith("/") and "\0" not in text and "\n" not in text and not text.endswith("/"):
        return QuoteService(path=text)
    raise InputError(
        f"invalid --qgs {text!r}: give the quote service's absolute unix socket path "
        "(e.g. /var/run/tdx-qgs/qgs.socket) or vsock:CID:PORT (e.g. vsock:2:4050)"
    )
