"""Kernel command lines: the running one (``/proc/cmdline``) and ones being edited.

The kernel treats ``-`` and ``_`` in parameter names alike and lets the last of
repeated parameters win; lookups here do the same. Values may be double-quoted
(``foo="a b"``), as the kernel's own parser allows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .root import HostRoot

_TOKEN = re.compile(r'(?:[^\s"]+|"[^"]*")+')


def split_args(text: str) -> list[str]:
    return _TOKEN.findall(text)


def arg_name(token: str) -> str:
    """A token's parameter name, normalised (``kvm-intel.tdx`` -> ``kvm_intel.tdx``)."""
    return token.split("=", 1)[0].replace("-", "_")


def arg_value(token: str) -> str | None:
    if "=" not in token:
        return None
    value = token.split("=", 1)[1]
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value


@dataclass(frozen=True)
class KernelCmdline:
    tokens: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> "KernelCmdline":
        return cls(tuple(split_args(text)))

    def has(self, name: str) -> bool:
        return any(arg_name(t) == arg_name(name) for t in self.tokens)

    def value(self, name: str) -> str | None:
        """The last value given for ``name`` (``""`` for a bare flag), None if absent."""
        found = None
        for token in self.tokens:
            if arg_name(token) == arg_name(name):
                found = arg_value(token) or ""
        return found

    def __str__(self) -> str:
        return " ".join(self.tokens)


def running_cmdline(root: HostRoot) -> KernelCmdline | None:
    text = root.read_value("/proc/cmdline")
    return None if text is None else KernelCmdline.parse(text)
