"""Named TD scenarios: user options + a fake host + the libvirt they target.

Shared by the golden-XML tests and the libvirt round-trip tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tdxvirt.config import Config
from tdxvirt.domain.policy import DomainPlan, plan_domain
from tdxvirt.domain.spec import TDSpec
from tdxvirt.errors import NotFoundError
from tdxvirt.facts import HostFacts
from tdxvirt.host.nvidia import known_bar_sizes
from tdxvirt.host.pci import PciDevice
from tdxvirt.lifecycle.assemble import resolve_loader, select_devices
from tdxvirt.pci import PciAddress
from tdxvirt.sim.hostroot import FakePciDevice, build_host_root

# Stable paths, so golden files do not depend on a temporary directory.
FILES = Path("/tmp/tdxvirt-golden-files")
OVMF = "/usr/share/ovmf/OVMF.inteltdx.ms.fd"
H100_BUSES = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)
# NVSwitch: device id from NVIDIA's list; one 32 MiB BAR (no real NVSwitch sysfs dump
# is at hand, so only ids, class and this BAR differ from the real H100 values).
NVSWITCH = {"device": "0x22a3", "class": "0x068000",
            "resource": "0x00000000e4000000 0x00000000e5ffffff 0x0000000000040200\n"}


@dataclass(frozen=True)
class Scenario:
    name: str
    options: dict
    devices: tuple[FakePciDevice, ...] = (FakePciDevice("0000:38:00.0"),)
    dialect: str = "native"
    libvirt_version: int = 12_008_000
    overlay_dir: str | None = None
    round_trip: bool = True  # define on the TDX-aware test driver and read back
    notes: str = field(default="")
    # A remote host as libvirt describes it (node devices: no BAR sizes; the firmware
    # libvirt's to pick): set, these replace the fake host root.
    libvirt_devices: tuple[PciDevice, ...] = ()


class LibvirtView(HostFacts):
    """A remote host's facts as tdxvirt.facts.libvirt gives them, for plan_for."""

    remote = True
    where = "host gpuhost"

    def __init__(self, devices: tuple[PciDevice, ...]):
        self.devices = {d.address: d for d in devices}

    def device(self, address):
        if address not in self.devices:
            raise NotFoundError(f"no PCI device {address} on {self.where}")
        return self.devices[address]

    def tdx_firmware(self, dialect):
        return None  # <os firmware='efi'>: libvirt picks the intel-tdx firmware there


# An H200 NVL (0x233B) of a remote host, as its node device says: tdxvirt's table of
# known GPUs has no BAR sizes for it, so the MMIO window must be given (--mmio-window).
REMOTE_H200 = PciDevice(PciAddress.parse("0000:17:00.0"), 0x10DE, 0x233B, 0x030200, 1,
                        "vfio-pci", "7", None, "GH100 [H200 NVL]",
                        (PciAddress.parse("0000:17:00.0"),))


# A B200 (0x2901, NVIDIA's tool's id): the 256 GiB large BAR users measured; BAR0 64 MiB
# and BAR4 32 MiB assumed (no Blackwell sysfs dump is public; only their being small counts).
def b200(bus: int, group: int) -> FakePciDevice:
    base = 0x4000_0000_0000 + bus * 0x100_0000_0000
    bars = ((base, 64 << 20), (base + (1 << 39), 256 << 30), (base + (1 << 40), 32 << 20))
    resource = "".join(f"{s:#018x} {s + n - 1:#018x} 0x000000000014220c\n" for s, n in bars)
    return FakePciDevice(f"0000:{bus:02x}:00.0", iommu_group=group, overrides={
        "device": "0x2901", "numa_node": str(group // 4), "resource": resource + (
            "0x0000000000000000 0x0000000000000000 0x0000000000000000\n" * 4)})


# Two B200s of a remote host, as node devices give them: no BARs (tdxvirt's measured sizes).
REMOTE_B200S = tuple(PciDevice(PciAddress.parse(f"0000:{bus:02x}:00.0"), 0x10DE, 0x2901, 0x030200, 0,
                               "vfio-pci", str(group), known_bar_sizes(0x10DE, 0x2901), "GB100 [B200]",
                               (PciAddress.parse(f"0000:{bus:02x}:00.0"),))
                     for group, bus in ((1, 0x18), (2, 0x2A)))


def files() -> dict[str, str]:
    """Create the small files the scenarios point at; return their paths."""
    FILES.mkdir(exist_ok=True)
    made = {}
    for name, content in (("base.qcow2", b"QFI\xfb" + b"\0" * 508), ("disk.raw", b"\0" * 512),
                          ("vmlinuz", b"kernel"), ("initrd.img", b"initrd"),
                          ("qemu-system-x86_64", b""), ("OVMF.inteltdx.fd", b""),
                          ("user-data", b"#cloud-config\npackages: [qemu-guest-agent]\n"),
                          # a public key made by ssh-keygen (ed25519; not secret)
                          ("id_ed25519.pub", b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDAZ9tagleOFYwvu"
                                             b"HWmc3qFL2SoZ9/RVL9v7UAyDBNxk tdx@golden\n")):
        path = FILES / name
        if not path.exists():
            path.write_bytes(content)
        made[name] = str(path)
    return made


def scenarios() -> list[Scenario]:
    f = files()
    eight = tuple(FakePciDevice(f"0000:{bus:02x}:00.0", iommu_group=i,
                                overrides={"numa_node": str(i // 4)})
                  for i, bus in enumerate(H100_BUSES))
    switches = tuple(FakePciDevice(f"0000:{bus:02x}:00.0", iommu_group=20 + i, driver=None,
                                   overrides={**NVSWITCH, "numa_node": str(i // 2)})
                     for i, bus in enumerate((0x05, 0x06, 0x07, 0x08)))
    b64 = "ABEiM0RVZneImaq7zN3u/wARIjNEVWZ3iJmqu8zd7v8AESIzRFVmd4iZqrvM3e7/"
    return [
        Scenario("one-gpu", {"name": "td-38-00-0", "gpus": ["38:00.0"]}),
        Scenario("two-gpus-numa", {
            "name": "two-numa", "gpus": ["38:00.0", "b8:00.0"], "vcpus": 16, "memory": "64G",
            "numa": "auto"},
            devices=(FakePciDevice("0000:38:00.0", overrides={"numa_node": "0"}),
                     FakePciDevice("0000:b8:00.0", iommu_group=43, overrides={"numa_node": "1"}))),
        Scenario("ppcie-8gpu-4nvswitch", {
            "name": "hgx", "ppcie": True, "managed": False, "vcpus": 64, "memory": "1T",
            "qemu_arg": ["-msg", "timestamp=on"]},  # the user's own, recorded with the TD
            devices=eight + switches, libvirt_version=11_006_000),
        Scenario("canonical-vsock-qgs", {
            "name": "canon", "gpus": ["38:00.0"], "dialect": "canonical", "qgs": "vsock:2:4050",
            "mr_config_id": b64, "mr_owner": b64, "mr_owner_config": b64},
            dialect="canonical", libvirt_version=11_000_000, round_trip=False,
            notes="Canonical's libvirt only: upstream rejects the SocketAddress child"),
        Scenario("qemu-args", {
            "name": "qargs", "gpus": ["38:00.0"], "dialect": "qemu-args",
            "qgs": "/var/run/tdx-qgs/qgs.socket", "debug": True, "qemu": f["qemu-system-x86_64"]},
            dialect="qemu-args", libvirt_version=11_003_000, round_trip=False,
            notes="defined on the real qemu driver instead (test_golden.py)"),
        Scenario("native-unix-qgs", {
            "name": "qgs", "gpus": ["38:00.0"], "qgs": "/var/run/tdx-qgs/qgs.socket",
            "policy": "0x10000000", "mr_config_id": b64, "allow_shared": True}),
        Scenario("direct-kernel-boot", {
            "name": "dkb", "gpus": ["38:00.0"], "kernel": f["vmlinuz"], "initrd": f["initrd.img"],
            "cmdline": "console=ttyS0 root=/dev/vda1", "network": "user", "ssh_port": 2222,
            "vsock": True, "user_data": f["user-data"]},
            overlay_dir="/var/lib/libvirt/images"),
        Scenario("image-overlay-cloud-init", {
            "name": "ovl", "gpus": ["38:00.0"], "image": f["base.qcow2"], "image_format": "qcow2",
            "os_variant": "ubuntu22.04", "allow_backing_file": True, "ovmf": f["OVMF.inteltdx.fd"],
            "network": "default", "ssh_key": [f["id_ed25519.pub"]]},
            overlay_dir="/var/lib/libvirt/images"),
        Scenario("remote-mmio-window", {
            "name": "remote", "gpus": ["17:00.0"], "mmio_window": "512G", "numa": "auto"},
            libvirt_devices=(REMOTE_H200,),
            notes="a remote host's GPU: NUMA from its node device, window given, firmware "
                  "libvirt's pick"),
        Scenario("mpt-8-b200", {
            "name": "mpt", "gpus": [f"{bus:02x}:00.0" for bus in H100_BUSES], "vcpus": 64,
            "memory": "1T", "imex_channel": True},
            devices=tuple(b200(bus, i) for i, bus in enumerate(H100_BUSES)),
            overlay_dir="/var/lib/libvirt/images",
            notes="Blackwell multi-GPU passthrough: 8 GPUs, no NVSwitch, a 4 TiB window"),
        Scenario("remote-mpt-2-b200", {"name": "rmpt", "gpus": ["18:00.0", "2a:00.0"]},
                 libvirt_devices=REMOTE_B200S,
                 notes="a remote host's B200s: the window from the measured BAR sizes"),
        Scenario("plain", {
            "name": "plain", "gpus": ["38:00.0"], "tdx": False, "virt_type": "qemu",
            "disk": f["disk.raw"], "memory": "4G", "vcpus": 2, "hugepages": "2M"},
            dialect="plain"),
    ]


def plan_for(scenario: Scenario, root_dir: Path) -> tuple[TDSpec, DomainPlan]:
    """The plan assemble_td would make on this host, minus the libvirt probe."""
    host = (LibvirtView(scenario.libvirt_devices) if scenario.libvirt_devices
            else build_host_root(root_dir, devices=scenario.devices))
    spec = TDSpec.from_user(**scenario.options, remote=bool(scenario.libvirt_devices))
    gpus, switches, _ = select_devices(host, spec)
    plan = plan_domain(spec, gpus=gpus, switches=switches, dialect=scenario.dialect,
                       libvirt_version=scenario.libvirt_version,
                       loader=resolve_loader(spec, Config(), host, scenario.dialect),
                       emulator=spec.qemu, overlay_dir=scenario.overlay_dir)
    return spec, plan
