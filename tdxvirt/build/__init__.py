"""Build pipelines: the TDX host kernel, QEMU and OVMF from a TOML manifest.

``distro`` finds what the host's distribution already provides (those components
are not planned unless asked), ``manifest`` reads and validates the manifest (shipped:
``upstream``, the default, and ``intel-device-passthrough``), ``steps`` turns it into
a plan of steps (fetch, patch, configure, build, install), ``stamps`` decides which
steps are already done, ``prereqs`` checks the tools those need, ``runner`` runs the
rest with progress and a log per step, and ``artifacts`` records what came out (with
``digests``) so ``define`` can use it. ``gitops`` fetches (through the manifest's
mirrors), ``source`` imports a local tree instead (``--source``), ``subprojects``
handles QEMU's meson subprojects offline.
"""

from __future__ import annotations

from ..errors import TdxvirtError

COMPONENTS = ("kernel", "qemu", "ovmf")


class BuildFailedError(TdxvirtError):
    """A build step failed; the message names the step and its log."""
