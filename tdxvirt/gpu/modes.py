"""Reading GPUs' CC / PPCIe modes here, through NVIDIA's tool, when it can run.

Where a start's preflight, the facts of this host and `host check` get their reader
(never for a remote host: its modes are unknown from here).
"""

from __future__ import annotations

import os

from ..host import HostRoot


def mode_reader(host: HostRoot, tool_path: str | None = None, timeout: float | None = None):
    """A reader of the GPUs' CC / PPCIe modes through NVIDIA's tool, or None when they
    cannot be read here (the tool is not installed, not root, or a fake host root
    with no tool named for it); ``timeout`` bounds each run of the tool."""
    from ..errors import TdxvirtError
    from . import admin_tool, ccmode
    from .devices import NVSWITCH, kind_of

    if os.geteuid() != 0:
        return None
    try:
        tool = admin_tool.locate(tool_path, host)
    except admin_tool.UntrustedToolError:
        raise  # a tool others could change is refused, never silently skipped
    except TdxvirtError:
        return None

    def read(devices):
        with_ppcie = any(kind_of(d) == NVSWITCH for d in devices)
        if timeout is None:
            return ccmode.query(tool, devices, with_ppcie=with_ppcie)
        return ccmode.query(tool, devices, with_ppcie=with_ppcie, timeout=timeout)

    return read
