"""Which distribution a host root holds, from ``/etc/os-release`` (or /usr/lib's)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from .root import HostRoot


@dataclass(frozen=True)
class OsRelease:
    id: str
    like: tuple[str, ...]
    pretty_name: str

    def is_like(self, *ids: str) -> bool:
        return self.id in ids or any(i in ids for i in self.like)


def read_os_release(root: HostRoot) -> OsRelease:
    fields: dict[str, str] = {}
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        try:
            text = root.read_text(path)
        except OSError:
            continue
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip().isidentifier():
                try:
                    parts = shlex.split(value, comments=False)
                except ValueError:
                    continue
                fields[key.strip()] = parts[0] if parts else ""
        break
    ident = fields.get("ID", "unknown")
    return OsRelease(ident, tuple(fields.get("ID_LIKE", "").split()),
                     fields.get("PRETTY_NAME", ident))
