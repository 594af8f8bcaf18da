"""TDX-capable OVMF, found the standard way: QEMU firmware descriptors.

QEMU's firmware.json interop spec: descriptors live in /usr/share/qemu/firmware and
/etc/qemu/firmware; a file in /etc overrides one of the same name in /usr/share, and
descriptors are considered in the order of their file names.
"""

from __future__ import annotations

import json

from ..errors import HostNotReadyError
from .root import HostRoot

DESCRIPTOR_DIRS = ("/usr/share/qemu/firmware", "/etc/qemu/firmware")


def _descriptors(root: HostRoot) -> list[str]:
    by_name: dict[str, str] = {}
    for directory in DESCRIPTOR_DIRS:  # later directories override earlier ones
        for name in root.listdir(directory):
            if name.endswith(".json"):
                by_name[name] = f"{directory}/{name}"
    return [by_name[name] for name in sorted(by_name)]


def find_tdx_ovmf(root: HostRoot) -> str:
    """Absolute host path of the first descriptor's firmware with feature intel-tdx."""
    for descriptor in _descriptors(root):
        try:
            data = json.loads(root.read_text(descriptor))
        except (OSError, ValueError):
            continue  # a broken third-party descriptor must not hide a good one
        mapping = data.get("mapping", {}) if isinstance(data, dict) else {}
        if "intel-tdx" in data.get("features", []) and mapping.get("device") == "memory":
            filename = mapping.get("filename")
            if isinstance(filename, str) and filename.startswith("/"):
                return filename
    raise HostNotReadyError(
        "no TDX-capable OVMF found (no QEMU firmware descriptor with feature "
        "'intel-tdx' in /usr/share/qemu/firmware); install Debian's ovmf-inteltdx "
        "or pass --ovmf PATH"
    )
