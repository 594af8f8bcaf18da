"""QEMU: the emulator libvirt uses knows ``tdx-guest`` (its ``-object help``), and its version."""

from __future__ import annotations

from ..host.commands import NOT_RUN
from .check import FAIL, OK, SKIP, WARN, Check
from .context import Context

TDX_OBJECT = "tdx-guest"
FIRST_TDX_QEMU = (10, 1, 0)  # upstream QEMU's first release with tdx-guest


def _version_text(version: tuple[int, int, int]) -> str:
    return ".".join(str(v) for v in version)


def checks(ctx: Context) -> list[Check]:
    if ctx.remote:
        return [Check("qemu: tdx-guest", SKIP, f"remote host ({ctx.uri}): QEMU is not run from "
                      "here; libvirt's domain capabilities speak for it below")]
    if ctx.test_driver and ctx.emulator is None:
        return [Check("qemu: tdx-guest", SKIP, "libvirt's test driver runs no QEMU")]
    if ctx.emulator is None:
        return [Check("qemu: tdx-guest", FAIL, "no QEMU found (qemu-system-x86_64)",
                      "install QEMU >= 10.1 (Debian: qemu-system-x86 from trixie-backports "
                      "or newer)")]
    if not ctx.root.exists(ctx.emulator):
        return [Check("qemu: tdx-guest", FAIL, f"libvirt names {ctx.emulator}, which is not "
                      f"on this host (host root {ctx.root.base})",
                      "install QEMU >= 10.1 or fix the emulator libvirt uses")]
    if not ctx.runs_programs:
        found = f"{ctx.emulator}: {NOT_RUN} (host root {ctx.root.base})"
        remedy = "run `tdxvirt host check` on that system itself to run its QEMU"
        return [Check("qemu: tdx-guest", SKIP, found, remedy),
                Check("qemu: version", SKIP, found, remedy)]
    objects, error = ctx.qemu_objects
    version = ctx.qemu_version
    shown = f"{ctx.emulator}" + (f" {_version_text(version)}" if version else "")
    if objects is None:
        tdx = Check("qemu: tdx-guest", FAIL, error or "no answer", "check that QEMU runs")
    elif TDX_OBJECT in objects:
        tdx = Check("qemu: tdx-guest", OK, f"{shown} lists {TDX_OBJECT}")
    else:
        tdx = Check("qemu: tdx-guest", FAIL, f"{shown} has no {TDX_OBJECT} object",
                    "install QEMU >= 10.1, or build it with TDX support")
    if version is None:
        ver = Check("qemu: version", WARN, f"`{ctx.emulator} --version` gave no version")
    elif version >= FIRST_TDX_QEMU:
        ver = Check("qemu: version", OK, _version_text(version))
    elif tdx.status == OK:
        ver = Check("qemu: version", OK, f"{_version_text(version)} (patched: has {TDX_OBJECT})")
    else:
        ver = Check("qemu: version", FAIL, f"{_version_text(version)} < 10.1",
                    "install QEMU >= 10.1")
    return [tdx, ver]
