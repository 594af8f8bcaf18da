"""SHA-256 and size of a build artifact, read bounded and only from a regular file.

The artifacts record keeps each file's digest so a file later replaced at the same
path (another OVMF.fd, a rebuilt QEMU) is told apart from the one that was built.
Reading refuses what is not a regular file (a FIFO would block, /dev/zero never
ends) and stops at ``MAX_BYTES``: no artifact of a kernel, QEMU or OVMF build comes
near it, so anything larger is not what the build made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# One reader for every digest tdxvirt keeps (also the TD record's, which libvirt's hook
# checks with the standard library alone): tdxvirt.filedigest.
from ..filedigest import MAX_BYTES, Digest, DigestError, digest

__all__ = ["MAX_BYTES", "Check", "Digest", "DigestError", "check", "digest"]


@dataclass(frozen=True)
class Check:
    """How an artifact's file compares with what was recorded."""

    state: str  # "ok", "changed", "missing", "unreadable", "unrecorded" (an older record)
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "ok"


def check(path: str, recorded: dict | None) -> Check:
    """Compare the file at ``path`` with its recorded ``{"sha256", "size"}``."""
    if os.path.isdir(path):  # the kernel's modules folder: existence is all that is kept
        return Check("ok", "a folder")
    if not os.path.lexists(path):
        return Check("missing", f"{path} no longer exists")
    try:
        now = digest(path)
    except DigestError as error:
        return Check("unreadable", str(error))
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), str):
        return Check("unrecorded", f"no digest was recorded for {path} (built by an older tdxvirt)")
    if now.sha256 != recorded["sha256"] or now.size != recorded.get("size"):
        return Check("changed", f"{path} changed since it was recorded: sha256 {recorded['sha256'][:16]} "
                                f"({recorded.get('size')} bytes) then, {now.sha256[:16]} ({now.size} bytes) now")
    return Check("ok", "")

