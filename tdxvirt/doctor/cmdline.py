"""The running kernel's command line: IOMMU on, KVM's TDX on, no hibernation."""

from __future__ import annotations

from ..host.cmdline import running_cmdline
from ..host.kconfig import read_kernel_config
from ..hostcfg import modprobe
from .check import FAIL, OK, SKIP, WARN, Check
from .context import Context

SETUP = "`tdxvirt host setup`, then reboot"


def _iommu(ctx: Context, cmdline) -> Check:
    name = "cmdline: intel_iommu=on"
    value = cmdline.value("intel_iommu")
    if value is not None and "on" in value.split(","):
        return Check(name, OK, f"intel_iommu={value}")
    if value is not None and "off" in value.split(","):
        return Check(name, FAIL, f"intel_iommu={value}", SETUP)
    config = read_kernel_config(ctx.root)
    if config is not None and config.enabled("INTEL_IOMMU_DEFAULT_ON"):
        return Check(name, OK, "not given; on by default (CONFIG_INTEL_IOMMU_DEFAULT_ON)")
    return Check(name, FAIL, "intel_iommu not on the kernel command line", SETUP)


def _kvm_tdx(ctx: Context, cmdline) -> Check:
    name = "cmdline: kvm_intel.tdx"
    value = cmdline.value("kvm_intel.tdx")
    if value is not None and value in modprobe.TRUE_VALUES:
        return Check(name, OK, f"kvm_intel.tdx={value} on the command line")
    options = modprobe.configured_options(ctx.root, "kvm_intel", "tdx")
    if options and options[-1].value in modprobe.TRUE_VALUES:
        return Check(name, OK, f"options kvm_intel tdx={options[-1].value} in {options[-1].file}")
    found = (f"kvm_intel.tdx={value} on the command line" if value is not None else
             f"tdx={options[-1].value} in {options[-1].file}" if options else
             "neither kvm_intel.tdx=on on the command line nor a modprobe.d option")
    return Check(name, FAIL, found, SETUP)


def _flag(cmdline, flag: str, why: str) -> Check:
    name = f"cmdline: {flag}"
    if cmdline.has(flag.split("=")[0]) and (
            "=" not in flag or cmdline.value(flag.split("=")[0]) == flag.split("=")[1]):
        return Check(name, OK, f"{flag} given")
    return Check(name, WARN, f"{flag} not on the kernel command line ({why})", SETUP)


def _groups(ctx: Context) -> Check:
    name = "iommu groups"
    groups = ctx.root.listdir("/sys/kernel/iommu_groups")
    if groups:
        return Check(name, OK, f"{len(groups)} groups in /sys/kernel/iommu_groups")
    return Check(name, FAIL, "/sys/kernel/iommu_groups is empty: the IOMMU is off",
                 "enable VT-d in the BIOS; " + SETUP + " (intel_iommu=on)")


def checks(ctx: Context) -> list[Check]:
    if skipped := ctx.skip_if_remote("kernel command line"):
        return [skipped]
    cmdline = running_cmdline(ctx.root)
    if cmdline is None:
        return [Check("kernel command line", SKIP, "/proc/cmdline not readable"), _groups(ctx)]
    return [
        _iommu(ctx, cmdline),
        _kvm_tdx(ctx, cmdline),
        _flag(cmdline, "nohibernate", "hibernating would lose TD private memory"),
        _flag(cmdline, "iommu=pt", "host devices then skip IOMMU translation"),
        _groups(ctx),
    ]
