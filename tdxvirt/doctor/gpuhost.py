"""The host around the GPUs: drivers that would take them, NVLink fabric services for
Blackwell multi-GPU passthrough on HGX boards, and the guest address width the GPUs'
MMIO window needs.

NVIDIA's order for confidential computing keeps every host driver off the GPUs a TD
gets: nouveau and nvidia take any NVIDIA GPU not bound to vfio-pci, and nova_core
(Ubuntu 25.10/26.04 kernels) takes a Blackwell GPU again after the reset that applies a
CC mode. On HGX B200/B300 the NVLink switches are no PCIe device of the TD: they are
managed on the host through ConnectX functions (15b3:1021) by Fabric Manager and the
NVLink subnet manager, and Fabric Manager 595+ leaves CC silently off unless
``PARTITION_RAIL_POLICY=symmetric`` (the word; ``1`` is not accepted).
"""

from __future__ import annotations

from ..host import nvidia
from ..host.fabric import FABRIC_SERVICES, running, switch_management
from ..host.pci import PciDevice
from ..host.procs import loaded_modules
from ..hostcfg import fabricmanager
from .check import FAIL, OK, SKIP, WARN, Check
from .context import Context

# Host drivers that bind NVIDIA GPUs, and why each is in the way.
GRABBING_DRIVERS = {
    "nouveau": "binds any NVIDIA GPU not on vfio-pci",
    "nova_core": "binds a Blackwell GPU again after the reset that applies its CC mode",
    "nvidia": "binds any NVIDIA GPU not on vfio-pci (fine if the TDs' GPUs are on vfio-pci first)",
}
BLACKLISTED_BY_SETUP = ("nouveau", "nova_core")
FM_CONFIG, RAIL_POLICY, FM_CONFIG_LIMIT = fabricmanager.PATH, fabricmanager.RAIL_POLICY, fabricmanager.LIMIT


def _drivers(ctx: Context, gpus: list[PciDevice]) -> Check:
    name = "gpu host drivers"
    loaded = loaded_modules(ctx.root)
    if loaded is None:
        return Check(name, SKIP, "/proc/modules not readable")
    found = [module for module in GRABBING_DRIVERS if module in loaded]
    if not found:
        return Check(name, OK, "none of " + ", ".join(GRABBING_DRIVERS) + " is loaded")
    why = "; ".join(f"{module} {GRABBING_DRIVERS[module]}" for module in found)
    blacklistable = [m for m in found if m in BLACKLISTED_BY_SETUP]
    remedy = ("`tdxvirt host setup` blacklists " + " and ".join(blacklistable) + ", then reboot"
              if blacklistable else
              "bind the TDs' GPUs to vfio-pci (`tdxvirt gpu detach BDF`) before nvidia does, or "
              "blacklist nvidia if this host uses no GPU itself")
    return Check(name, WARN, f"loaded: {why}", remedy)


def _fm_rail_policy(ctx: Context) -> Check:
    name = "fabric manager: rail policy"
    from ..errors import TdxvirtError
    from ..userfile import read_user_file

    try:
        text = read_user_file(ctx.root.path(FM_CONFIG), "Fabric Manager's configuration",
                              limit=FM_CONFIG_LIMIT).decode(errors="replace")
    except TdxvirtError:
        return Check(name, FAIL, f"{FM_CONFIG} missing or unreadable",
                     "install NVIDIA Fabric Manager (the driver's version) on the host")
    value = fabricmanager.rail_policy(text)
    if value == "symmetric":
        return Check(name, OK, f"{RAIL_POLICY}=symmetric")
    found = f"{RAIL_POLICY}={value}" if value is not None else f"no {RAIL_POLICY}"
    return Check(name, FAIL, f"{found} in {FM_CONFIG}: Fabric Manager 595+ then leaves CC off "
                 "without saying so", f"`tdxvirt host setup` sets {RAIL_POLICY}=symmetric (the "
                 f"word) in {FM_CONFIG}; then restart nvidia-fabricmanager")


def _fabric(ctx: Context, gpus: list[PciDevice], management: list[PciDevice]) -> list[Check]:
    """Only on a board with Blackwell GPUs and ConnectX switch management (HGX B200/B300)."""
    where = f"{len(management)} ConnectX switch-management function(s)"
    remedies = {
        "fabric manager": "install and start nvidia-fabricmanager (the driver's version): "
                          "multi-GPU passthrough needs it",
        "nvlink subnet manager": "install and start NVIDIA's NVLink subnet manager (nvlsm) "
                                 "beside Fabric Manager"}
    checks = []
    for service in FABRIC_SERVICES:  # the same reading `gpu cc-mode --set on` refuses on
        process = running(ctx.root, service)
        checks.append(Check(service.label, OK, f"running (pid {process.pid})") if process else
                      Check(service.label, FAIL, f"not running, with {where} on the board",
                            remedies[service.label]))
    checks.append(_fm_rail_policy(ctx))
    return checks


def _address_width(ctx: Context, gpus: list[PciDevice]) -> Check | None:
    """Whether the host's physical address width leaves room for the window all its GPUs
    need in one TD: OVMF places the window above memory, aligned to its size."""
    from ..domain.policy import mmio_window_mb

    name = "gpu: address width"
    window = mmio_window_mb(gpus)
    cpuinfo = ctx.root.read_value("/proc/cpuinfo")
    if window is None or cpuinfo is None:
        return None
    bits = next((int(line.split(":")[1].split()[0]) for line in cpuinfo.splitlines()
                 if line.startswith("address sizes") and ":" in line), None)
    if bits is None:
        return None
    needed = (window * 1024 * 1024 * 2 - 1).bit_length()  # the window and as much below it
    what = f"the {window // 1024} GiB window {len(gpus)} GPU(s) need in one TD"
    if bits >= needed:
        return Check(name, OK, f"{bits} bits physical: room for {what}")
    return Check(name, FAIL, f"{bits} bits physical, {what} needs {needed}",
                 "fewer GPUs per TD, or a CPU/BIOS setting with more physical address bits")


def checks(ctx: Context) -> list[Check]:
    if skipped := ctx.skip_if_remote("gpu host"):
        return [skipped]
    from .gpus import local_gpus

    gpus = [d for d in local_gpus(ctx) if nvidia.kind_of(d) == nvidia.GPU]
    if not gpus:
        return []
    result = [_drivers(ctx, gpus)]
    if any(nvidia.generation(g) == nvidia.BLACKWELL_GEN for g in gpus):
        management = switch_management(ctx.root)
        if management:
            result += _fabric(ctx, gpus, management)
    if (width := _address_width(ctx, gpus)) is not None:
        result.append(width)
    return result

