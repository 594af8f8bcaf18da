"""udev rules that let QEMU's group open the VFIO and iommufd devices (Canonical's way).

Used with ``--security-driver keep``: the security driver stays on and libvirt no
longer changes device ownership (dynamic_ownership = 0), so the device nodes
themselves must be group-accessible:
- ``/dev/vfio/N`` (legacy VFIO groups): subsystem ``vfio``
- ``/dev/vfio/vfio`` (the legacy container) and ``/dev/iommu``: misc devices
- ``/dev/vfio/devices/vfioN`` (iommufd per-device cdevs): subsystem ``vfio-dev``
"""

from __future__ import annotations

import re

from ..errors import InputError

FILE = "/etc/udev/rules.d/70-tdxvirt-vfio.rules"
RELOAD = ("udevadm", "control", "--reload-rules")
TRIGGER = (
    ("udevadm", "trigger", "--subsystem-match=vfio", "--subsystem-match=vfio-dev"),
    ("udevadm", "trigger", "--subsystem-match=misc", "--sysname-match=vfio",
     "--sysname-match=iommu"),
)
_GROUP = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\$?")


def render(group: str) -> str:
    if not _GROUP.fullmatch(group):
        raise InputError(f"invalid group name {group!r} for a udev rule; pass --group NAME")
    rule = f'GROUP="{group}", MODE="0660"'
    return "\n".join([
        "# Written by `tdxvirt host setup --security-driver keep`; `--revert` removes it.",
        "# QEMU runs in this group and must open the VFIO / iommufd device nodes itself.",
        f'SUBSYSTEM=="vfio", {rule}',
        f'SUBSYSTEM=="vfio-dev", {rule}',
        f'SUBSYSTEM=="misc", KERNEL=="vfio", {rule}',
        f'SUBSYSTEM=="misc", KERNEL=="iommu", {rule}',
    ]) + "\n"


def rules_group(text: str) -> str | None:
    """The group tdxvirt's rules grant (None when the text is not tdxvirt's rules)."""
    match = re.search(r'SUBSYSTEM=="vfio-dev", GROUP="([^"]+)"', text)
    return match.group(1) if match else None
