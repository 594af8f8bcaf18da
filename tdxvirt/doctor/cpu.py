"""CPU and firmware: TDX enabled by the BIOS, the TDX module up, KVM's TDX on."""

from __future__ import annotations

from ..host.kmsg import KernelLogUnreadable, read_kernel_log, tdx_module_version
from ..virt.dialect import KVM_INTEL_TDX as KVM_TDX
from .check import FAIL, OK, SKIP, Check
from .context import Context

TDX_FLAG = "tdx_host_platform"
BIOS_REMEDY = ("enable TDX in the BIOS (TME, TME-MT/MKTME, TDX, TDX SEAM loader) and boot "
               "a kernel with CONFIG_INTEL_TDX_HOST (Linux >= 6.16)")


def _cpuinfo(ctx: Context) -> Check:
    name = "cpu: TDX flag"
    text = ctx.root.read_value("/proc/cpuinfo")
    if text is None:
        return Check(name, SKIP, "/proc/cpuinfo not readable")
    vendor, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id" and vendor is None:
            vendor = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    if vendor and vendor != "GenuineIntel":
        return Check(name, FAIL, f"{vendor} CPU: TDX is Intel's", "use a 4th/5th-gen Xeon "
                     "(Sapphire Rapids, Emerald Rapids) or later")
    if TDX_FLAG in flags:
        return Check(name, OK, f"{TDX_FLAG} in /proc/cpuinfo")
    return Check(name, FAIL, f"no {TDX_FLAG} in /proc/cpuinfo flags", BIOS_REMEDY)


def _module(ctx: Context) -> Check:
    name = "cpu: TDX module"
    kvm_tdx = ctx.root.read_value(KVM_TDX)
    try:
        log = read_kernel_log(ctx.root)
    except KernelLogUnreadable:
        log = None
    lines = [m for m in (log or []) if m.startswith("virt/tdx:") or "TDX module" in m]
    failed = [m for m in lines if "fail" in m.lower() or "error" in m.lower()]
    version = tdx_module_version(lines)
    if any("module initialized" in m for m in lines):
        return Check(name, OK, "initialized (kernel log)" + (f"; version {version}" if version else ""))
    if failed:
        return Check(name, FAIL, failed[-1], "update the BIOS and the TDX module (Intel's "
                     "releases / your vendor's firmware); the kernel log has details")
    if kvm_tdx == "Y":
        return Check(name, OK, "initialized (KVM's tdx parameter is Y)")
    if log is None:
        return Check(name, SKIP, "kernel log not readable and KVM's TDX is not on",
                     "run as root to read the kernel log")
    return Check(name, FAIL, "no 'virt/tdx: module initialized' in the kernel log",
                 "load kvm_intel with tdx=on (`tdxvirt host setup`, reboot); if the log "
                 "then shows no TDX lines: " + BIOS_REMEDY)


def _kvm(ctx: Context) -> Check:
    name = "cpu: kvm_intel tdx"
    value = ctx.root.read_value(KVM_TDX)
    if value == "Y":
        return Check(name, OK, f"{KVM_TDX} = Y")
    if value is not None:
        return Check(name, FAIL, f"{KVM_TDX} = {value}",
                     "`tdxvirt host setup` (kvm_intel tdx=on), then reboot; if it stays N, "
                     "the kernel log says why (BIOS, TDX module)")
    if ctx.root.exists("/sys/module/kvm_intel"):
        return Check(name, FAIL, "kvm_intel has no tdx parameter (kernel without KVM TDX)",
                     "boot a kernel with KVM TDX host support (Linux >= 6.16)")
    return Check(name, FAIL, "kvm_intel is not loaded", "`modprobe kvm_intel tdx=on`; "
                 "`tdxvirt host setup` makes it permanent")


def checks(ctx: Context) -> list[Check]:
    if skipped := ctx.skip_if_remote("cpu: TDX"):
        return [skipped]
    return [_cpuinfo(ctx), _module(ctx), _kvm(ctx)]
