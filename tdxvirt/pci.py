"""PCI addresses as users type them (``38:00.0``) and as libvirt wants them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InputError

# [domain:]bus:slot.function, hex; slot is 5 bits and function 3 bits on PCI.
_BDF = re.compile(
    r"(?:(?P<domain>[0-9a-fA-F]{1,4}):)?(?P<bus>[0-9a-fA-F]{1,2}):"
    r"(?P<slot>[0-9a-fA-F]{1,2})\.(?P<function>[0-7])"
)


@dataclass(frozen=True, order=True)
class PciAddress:
    domain: int
    bus: int
    slot: int
    function: int

    @classmethod
    def parse(cls, text: str) -> "PciAddress":
        match = _BDF.fullmatch(text.strip()) if isinstance(text, str) else None
        if match is None or int(match["slot"], 16) > 0x1F:
            raise InputError(
                f"invalid PCI address {text!r}: expected BUS:SLOT.FUNCTION or "
                "DOMAIN:BUS:SLOT.FUNCTION in hex, e.g. 38:00.0 or 0000:38:00.0"
            )
        return cls(
            domain=int(match["domain"] or "0", 16),
            bus=int(match["bus"], 16),
            slot=int(match["slot"], 16),
            function=int(match["function"]),
        )

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function:x}"

    @property
    def short(self) -> str:
        """``38:00.0`` form, used in default names."""
        return f"{self.bus:02x}:{self.slot:02x}.{self.function:x}"
