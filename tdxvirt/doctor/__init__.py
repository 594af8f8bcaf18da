"""``tdxvirt host check``: every known way a TD with GPUs fails on host configuration.

One module per area; each returns Check rows. ``run_checks`` runs them in the order a
person fixes them: CPU and firmware, kernel, VFIO, QEMU, libvirt, OVMF, qemu.conf, GPUs.
"""

from __future__ import annotations

from . import cmdline, connection, cpu, gpuhost, gpus, hook, interrupted, kconfig, network, ovmf, qemu, qemuconf, vfio
from .check import Check, failed
from .context import Context

AREAS = (cpu, kconfig, cmdline, vfio, qemu, connection, ovmf, qemuconf, hook, network, interrupted,
         gpus, gpuhost)


def run_checks(ctx: Context) -> list[Check]:
    results: list[Check] = []
    for area in AREAS:
        results += area.checks(ctx)
    return results


__all__ = ["AREAS", "Check", "Context", "failed", "run_checks"]
