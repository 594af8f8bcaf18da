"""NVIDIA GPUs: driver, IOMMU group viability, CC mode.

The facts come from tdxvirt.facts: sysfs for a local URI, libvirt's node devices for
a remote one (the same device record, PciDevice, either way). A group is viable when
every other member is on vfio-pci, has no driver, or is a PCI bridge (QEMU refuses a
group with a member bound to any other host driver).
"""

from __future__ import annotations

from ..errors import InputError, NotFoundError, TdxvirtError
from ..facts import HostFacts
from ..host import nvidia
from ..host.pci import PciDevice
from ..pci import PciAddress
from .check import FAIL, OK, SKIP, WARN, Check
from .context import Context

BRIDGE_CLASS = 0x0604
VIABLE_DRIVERS = (None, "vfio-pci", "pci-stub")


def _facts(ctx: Context) -> HostFacts:
    if ctx.remote:
        from ..facts.libvirt import LibvirtFacts

        return LibvirtFacts(ctx.conn, ctx.uri)
    from ..facts.local import LocalFacts

    return LocalFacts(ctx.root, ctx.uri or "")


def local_gpus(ctx: Context) -> list[PciDevice]:
    """Every NVIDIA GPU / NVSwitch in the host root's sysfs."""
    from ..facts.local import LocalFacts

    return LocalFacts(ctx.root, ctx.uri or "").nvidia_devices()


def _unknown(address: PciAddress) -> PciDevice:
    """A group member the host's facts do not describe: every fact unknown."""
    return PciDevice(address, 0, 0, 0, None, None, None, None)


def _members(facts: HostFacts, device: PciDevice) -> list[PciDevice]:
    """The other devices of ``device``'s IOMMU group."""
    members = []
    for address in facts.group_members(device):
        if address == device.address:
            continue
        try:
            members.append(facts.device(address))
        except (NotFoundError, InputError):
            members.append(_unknown(address))
    return members


def _gpu_checks(facts: HostFacts, gpu: PciDevice, read_modes=None) -> list[Check]:
    from ..facts.libvirt import nodedev_name

    remote = facts.remote
    name = f"gpu {gpu.address}"
    if not nvidia.is_passthrough_candidate(gpu):
        return [Check(name, FAIL, f"not an NVIDIA GPU or NVSwitch (vendor {gpu.vendor:#06x}, "
                      f"class {gpu.pci_class:#08x})", "pass a GPU's address (`lspci -D -d 10de:`)")]
    model = nvidia.model_name(gpu)
    checks = []
    if gpu.driver == "vfio-pci":
        checks.append(Check(f"{name}: driver", OK, f"{model}: vfio-pci"))
    elif gpu.driver is None:
        checks.append(Check(f"{name}: driver", WARN if not remote else SKIP,
                            f"{model}: no driver bound" + (" (or not reported by libvirt)"
                                                           if remote else ""),
                            "bind it to vfio-pci before setting CC mode (NVIDIA's order); "
                            "a managed hostdev also binds it when the TD starts"))
    else:
        checks.append(Check(f"{name}: driver", WARN, f"{model}: bound to {gpu.driver}",
                            "bind it to vfio-pci (`virsh nodedev-detach "
                            f"{nodedev_name(gpu.address)}`) before setting CC mode"))
    if gpu.iommu_group is None:
        checks.append(Check(f"{name}: iommu group", FAIL, "in no IOMMU group: the IOMMU is off",
                            "`tdxvirt host setup` (intel_iommu=on), reboot"))
    else:
        members = _members(facts, gpu)
        bridges = {m.address for m in members if (m.pci_class >> 8) == BRIDGE_CLASS}
        blocking = [m for m in members
                    if m.driver not in VIABLE_DRIVERS and m.address not in bridges]
        # libvirt's node devices name no driver for an unbound device (and some drivers
        # drop it): remotely, a member without one is unknown rather than viable.
        unknown = [m for m in members
                   if remote and m.driver is None and m.address not in bridges]
        group = gpu.iommu_group
        if blocking:
            checks.append(Check(
                f"{name}: iommu group", FAIL, f"group {group} not viable: " + ", ".join(
                    f"{m.address} on {m.driver}" for m in blocking),
                "bind every device of the group to vfio-pci (`virsh nodedev-detach`) "
                "or pass them all to the TD"))
        elif unknown:
            checks.append(Check(
                f"{name}: iommu group", WARN, f"group {group}: libvirt reports no driver "
                "for " + ", ".join(str(m.address) for m in unknown) + " (unbound, or not reported)",
                "run `tdxvirt host check` on that host to read sysfs"))
        else:
            others = f" with {len(members)} other device(s)" if members else " alone"
            checks.append(Check(f"{name}: iommu group", OK, f"group {group}{others}: viable"))
    checks.append(_cc_check(name, gpu, read_modes))
    return checks


def _cc_check(name: str, gpu: PciDevice, read_modes) -> Check:
    """CC mode through NVIDIA's tool (gpu.modes.mode_reader) when it can run here."""
    if isinstance(read_modes, str):  # the named tool was refused (run as root)
        return Check(f"{name}: cc mode", FAIL, f"not read: {read_modes}",
                     "give a tool only root can change (see FOUND)")
    if read_modes is None:
        return Check(f"{name}: cc mode", SKIP, "unknown (NVIDIA's tool not installed, not "
                     "root, or not this machine's GPU)", "`pip install 'tdxvirt[gpu]'`, run as root")
    result = read_modes([gpu])[0]
    if not result.ok:
        return Check(f"{name}: cc mode", WARN, f"unknown: {result.result}",
                     f"`tdxvirt gpu cc-mode {gpu.address}` shows the tool's error")
    if result.cc_mode in ("on", "devtools"):
        return Check(f"{name}: cc mode", OK, f"CC {result.cc_mode}")
    return Check(f"{name}: cc mode", WARN, f"CC {result.cc_mode}: a TD needs it on (fine "
                 "for a VM without TDX)", f"`tdxvirt gpu cc-mode {gpu.address} --set on`")


def checks(ctx: Context) -> list[Check]:
    if ctx.remote and ctx.conn is None:
        return [Check("gpus", SKIP, "libvirt not reachable: no node devices to read")]
    facts = _facts(ctx)
    addresses = ctx.gpus or tuple(d.address for d in facts.nvidia_devices())
    found: list[PciDevice | str] = []
    for address in addresses:
        try:
            found.append(facts.device(address))
        except NotFoundError:
            found.append(str(address))
    if not found:
        return [Check("gpus", WARN, "no NVIDIA GPU found",
                      "check `lspci -D -d 10de:`; pass --for-gpu BDF to check one")]
    read_modes = None
    if not ctx.remote:  # NVIDIA's tool runs on this machine's GPUs only
        from ..gpu.admin_tool import UntrustedToolError, locate
        from ..gpu.modes import mode_reader

        try:
            locate(None, ctx.root)
        except UntrustedToolError as refused:
            read_modes = str(refused)  # shown on each GPU's cc mode row, never run
        except TdxvirtError:
            pass  # no tool: mode_reader says so below
        if read_modes is None:
            read_modes = mode_reader(ctx.root)
    result = []
    for gpu in found:
        if isinstance(gpu, str):
            result.append(Check(f"gpu {gpu}", FAIL, f"no such PCI device on {facts.where}",
                                "`lspci -D -d 10de:` lists the NVIDIA devices"))
        else:
            result += _gpu_checks(facts, gpu, read_modes)
    return result
