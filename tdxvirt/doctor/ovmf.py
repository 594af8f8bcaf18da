"""OVMF: a TDX-capable firmware, found through QEMU's firmware descriptors.

For a remote URI, libvirt's domain capabilities list the firmware it knows instead.
"""

from __future__ import annotations

from ..errors import HostNotReadyError
from ..host.firmware import find_tdx_ovmf
from .check import FAIL, OK, SKIP, WARN, Check
from .context import Context

NAME = "ovmf: TDX firmware"


def checks(ctx: Context) -> list[Check]:
    if ctx.remote:
        if ctx.domcaps is None:
            return [Check(NAME, SKIP, "remote host and no domain capabilities to list firmware")]
        loaders = ctx.domcaps.xpath("os/loader/value/text()")
        tdx = [path for path in loaders if "tdx" in path.lower()]
        if tdx:
            return [Check(NAME, OK, f"libvirt lists {tdx[0]}")]
        return [Check(NAME, WARN, "no firmware named for TDX among libvirt's loaders",
                      "install ovmf-inteltdx on that host (or pass --ovmf PATH to define)")]
    try:
        path = find_tdx_ovmf(ctx.root)
    except HostNotReadyError as error:
        return [Check(NAME, FAIL, "no QEMU firmware descriptor with feature intel-tdx",
                      str(error).split("; ", 1)[-1])]
    if not ctx.root.exists(path):
        return [Check(NAME, FAIL, f"the descriptor names {path}, which does not exist",
                      "reinstall ovmf-inteltdx")]
    return [Check(NAME, OK, path)]
