"""Refusing host changes without root, before anything is read or written."""

from __future__ import annotations

import os
from typing import Callable

from ..errors import HostNotReadyError

CHANGES_DRIVERS = "it changes which driver has PCI devices"
CHANGES_MODE = "NVIDIA's tool maps the GPU's registers and resets it"
READS_REGISTERS = "NVIDIA's tool maps the GPU's registers to read them"


def require_root(what: str, why: str, euid: Callable[[], int] = os.geteuid,
                 dry_run_hint: bool = True) -> None:
    """``euid`` is injectable so tests can play an ordinary user."""
    if euid() != 0:
        hint = ", or add --dry-run to see what it would do" if dry_run_hint else ""
        raise HostNotReadyError(f"{what} needs root ({why}); run it with sudo{hint}")
