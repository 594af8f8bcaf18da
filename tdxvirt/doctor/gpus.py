"""NVIDIA GPUs: driver, IOMMU group viability, CC mode.

Locally the facts come from sysfs; for a remote URI from libvirt's node devices.
A group is viable when every other member is on vfio-pci, has no driver, or is a PCI
bridge (QEMU refuses a group with a member bound to any other host driver).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError, NotFoundError, TdxvirtError
from ..host import nvidia
from ..host.pci import PCI_DEVICES, PciDevice, read_device
from ..pci import PciAddress
from .check import FAIL, OK, SKIP, WARN, Check
from .context import Context

BRIDGE_CLASS = 0x0604
VIABLE_DRIVERS = (None, "vfio-pci", "pci-stub")


@dataclass(frozen=True)
class Member:
    address: str
    driver: str | None
    pci_class: int


@dataclass(frozen=True)
class Gpu:
    address: str
    vendor: int
    device: int
    pci_class: int
    driver: str | None
    group: str | None
    members: tuple[Member, ...]  # the group's other devices

    @property
    def candidate(self) -> bool:
        return nvidia.is_passthrough_candidate(self.pci())

    @property
    def model(self) -> str:
        return nvidia.model_name(self.pci())

    def pci(self) -> PciDevice:
        return PciDevice(PciAddress.parse(self.address), self.vendor, self.device,
                         self.pci_class, None, self.driver, self.group, ())


def local_gpus(ctx: Context) -> list[PciDevice]:
    """Every NVIDIA GPU / NVSwitch in the host root's sysfs."""
    found = []
    for name in ctx.root.listdir(PCI_DEVICES):
        try:
            device = read_device(ctx.root, PciAddress.parse(name))
        except (NotFoundError, InputError, ValueError):
            continue  # gone meanwhile, or not a PCI address: not a GPU
        if nvidia.is_passthrough_candidate(device):
            found.append(device)
    return found


def _from_sysfs(ctx: Context, address: PciAddress) -> Gpu:
    device = read_device(ctx.root, address)
    members = []
    if device.iommu_group is not None:
        for name in ctx.root.listdir(f"/sys/kernel/iommu_groups/{device.iommu_group}/devices"):
            if name == str(address):
                continue
            base = f"{PCI_DEVICES}/{name}"
            pci_class = ctx.root.read_value(f"{base}/class") or "0"
            members.append(Member(name, ctx.root.link_name(f"{base}/driver"),
                                  int(pci_class, 0) >> 8))
    return Gpu(str(address), device.vendor, device.device, device.pci_class,
               device.driver, device.iommu_group, tuple(members))


def _nodedev_name(address: str) -> str:
    return "pci_" + address.replace(":", "_").replace(".", "_")


def _parse_nodedev(xml: str):
    from lxml import etree

    root = etree.fromstring(xml.encode())
    cap = root.find("capability[@type='pci']")
    if cap is None:
        return None
    address = "{:04x}:{:02x}:{:02x}.{:x}".format(
        *(int(cap.findtext(f, "0"), 0) for f in ("domain", "bus", "slot", "function")))
    group = cap.find("iommuGroup")
    members = []
    if group is not None:
        for a in group.findall("address"):
            members.append("{:04x}:{:02x}:{:02x}.{:x}".format(
                *(int(a.get(f, "0"), 0) for f in ("domain", "bus", "slot", "function"))))
    return {
        "address": address,
        "vendor": int(cap.find("vendor").get("id", "0"), 0) if cap.find("vendor") is not None else 0,
        "device": int(cap.find("product").get("id", "0"), 0) if cap.find("product") is not None else 0,
        "class": int(cap.findtext("class", "0"), 0),
        "driver": root.findtext("driver/name"),
        "group": group.get("number") if group is not None else None,
        "members": members,
    }


def _nodedev_gpus(ctx: Context, wanted: tuple[PciAddress, ...]) -> list[Gpu | str]:
    import libvirt

    devices = {}
    for dev in ctx.conn.listAllDevices(libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_PCI_DEV):
        facts = _parse_nodedev(dev.XMLDesc(0))
        if facts:
            devices[facts["address"]] = facts
    result: list[Gpu | str] = []
    addresses = [str(a) for a in wanted] or sorted(devices)
    for address in addresses:
        facts = devices.get(address)
        if facts is None:
            result.append(address)
            continue
        members = tuple(Member(m, devices.get(m, {}).get("driver"),
                               devices.get(m, {}).get("class", 0) >> 8)
                        for m in facts["members"] if m != address)
        gpu = Gpu(address, facts["vendor"], facts["device"], facts["class"],
                  facts["driver"], facts["group"], members)
        if wanted or gpu.candidate:
            result.append(gpu)
    return result


def _gpu_checks(gpu: Gpu, remote: bool, read_modes=None) -> list[Check]:
    name = f"gpu {gpu.address}"
    if not gpu.candidate:
        return [Check(name, FAIL, f"not an NVIDIA GPU or NVSwitch (vendor {gpu.vendor:#06x}, "
                      f"class {gpu.pci_class:#08x})", "pass a GPU's address (`lspci -D -d 10de:`)")]
    checks = []
    if gpu.driver == "vfio-pci":
        checks.append(Check(f"{name}: driver", OK, f"{gpu.model}: vfio-pci"))
    elif gpu.driver is None:
        checks.append(Check(f"{name}: driver", WARN if not remote else SKIP,
                            f"{gpu.model}: no driver bound" + (" (or not reported by libvirt)"
                                                               if remote else ""),
                            "bind it to vfio-pci before setting CC mode (NVIDIA's order); "
                            "a managed hostdev also binds it when the TD starts"))
    else:
        checks.append(Check(f"{name}: driver", WARN, f"{gpu.model}: bound to {gpu.driver}",
                            "bind it to vfio-pci (`virsh nodedev-detach "
                            f"{_nodedev_name(gpu.address)}`) before setting CC mode"))
    if gpu.group is None:
        checks.append(Check(f"{name}: iommu group", FAIL, "in no IOMMU group: the IOMMU is off",
                            "`tdxvirt host setup` (intel_iommu=on), reboot"))
    else:
        blocking = [m for m in gpu.members
                    if m.driver not in VIABLE_DRIVERS and m.pci_class != BRIDGE_CLASS]
        # libvirt's node devices name no driver for an unbound device (and some drivers
        # drop it): remotely, a member without one is unknown rather than viable.
        unknown = [m for m in gpu.members
                   if remote and m.driver is None and m.pci_class != BRIDGE_CLASS]
        if blocking:
            checks.append(Check(
                f"{name}: iommu group", FAIL, f"group {gpu.group} not viable: " + ", ".join(
                    f"{m.address} on {m.driver}" for m in blocking),
                "bind every device of the group to vfio-pci (`virsh nodedev-detach`) "
                "or pass them all to the TD"))
        elif unknown:
            checks.append(Check(
                f"{name}: iommu group", WARN, f"group {gpu.group}: libvirt reports no driver "
                "for " + ", ".join(m.address for m in unknown) + " (unbound, or not reported)",
                "run `tdxvirt host check` on that host to read sysfs"))
        else:
            others = f" with {len(gpu.members)} other device(s)" if gpu.members else " alone"
            checks.append(Check(f"{name}: iommu group", OK, f"group {gpu.group}{others}: viable"))
    checks.append(_cc_check(name, gpu, read_modes))
    return checks


def _cc_check(name: str, gpu: Gpu, read_modes) -> Check:
    """CC mode through NVIDIA's tool (preflight.mode_reader) when it can run here."""
    if isinstance(read_modes, str):  # the named tool was refused (run as root)
        return Check(f"{name}: cc mode", FAIL, f"not read: {read_modes}",
                     "give a tool only root can change (see FOUND)")
    if read_modes is None:
        return Check(f"{name}: cc mode", SKIP, "unknown (NVIDIA's tool not installed, not "
                     "root, or not this machine's GPU)", "`pip install 'tdxvirt[gpu]'`, run as root")
    result = read_modes([gpu.pci()])[0]
    if not result.ok:
        return Check(f"{name}: cc mode", WARN, f"unknown: {result.result}",
                     f"`tdxvirt gpu cc-mode {gpu.address}` shows the tool's error")
    if result.cc_mode in ("on", "devtools"):
        return Check(f"{name}: cc mode", OK, f"CC {result.cc_mode}")
    return Check(f"{name}: cc mode", WARN, f"CC {result.cc_mode}: a TD needs it on (fine "
                 "for a VM without TDX)", f"`tdxvirt gpu cc-mode {gpu.address} --set on`")


def checks(ctx: Context) -> list[Check]:
    if ctx.remote:
        if ctx.conn is None:
            return [Check("gpus", SKIP, "libvirt not reachable: no node devices to read")]
        found = _nodedev_gpus(ctx, ctx.gpus)
    else:
        addresses = ctx.gpus or tuple(d.address for d in local_gpus(ctx))
        found = []
        for address in addresses:
            try:
                found.append(_from_sysfs(ctx, address))
            except NotFoundError:
                found.append(str(address))
    if not found:
        return [Check("gpus", WARN, "no NVIDIA GPU found",
                      "check `lspci -D -d 10de:`; pass --for-gpu BDF to check one")]
    read_modes = None
    if not ctx.remote:
        from ..gpu.admin_tool import UntrustedToolError, locate
        from ..preflight import mode_reader

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
            result.append(Check(f"gpu {gpu}", FAIL, "no such PCI device on this host",
                                "`lspci -D -d 10de:` lists the NVIDIA devices"))
        else:
            result += _gpu_checks(gpu, ctx.remote, read_modes)
    return result
