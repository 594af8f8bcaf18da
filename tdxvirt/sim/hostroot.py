"""Fake host roots built from real hardware data.

Used by the simulated host and by tests; every file written here copies a value read
from a real machine (``data/``) unless a test overrides it on purpose.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..host import HostRoot
from .pciconfig import config_space, modalias

H100_FIXTURE = "h100-sxm5-80gb"
CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+ (tdxvirt simulated host)
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush \
dts acpi mmx fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc vmx \
smx est tm2 ssse3 sdbg fma cx16 xtpr pdcm pcid dca sse4_1 sse4_2 x2apic movbe popcnt \
aes xsave avx f16c rdrand lahf_lm abm 3dnowprefetch tme avx512f avx512dq sgx \
tdx_host_platform

"""
CMDLINE = ("BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro console=ttyS0,115200 intel_iommu=on iommu=pt "
           "kvm_intel.tdx=on nohibernate\n")
TDX_OVMF = "/usr/share/ovmf/OVMF.inteltdx.ms.fd"


@dataclass(frozen=True)
class FakePciDevice:
    address: str  # full form, 0000:38:00.0
    fixture: str = H100_FIXTURE
    overrides: dict[str, str] = field(default_factory=dict)  # sysfs file -> value
    driver: str | None = "vfio-pci"
    iommu_group: int | None = 42


def _data() -> Path:
    return Path(str(resources.files("tdxvirt.sim").joinpath("data")))


def _symlink(target: str, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(target, link)


def _add_pci_device(root: Path, dev: FakePciDevice) -> None:
    sysfs = root / "sys/bus/pci/devices" / dev.address
    sysfs.mkdir(parents=True, exist_ok=True)
    for source in (_data() / dev.fixture / "sysfs").iterdir():
        shutil.copyfile(source, sysfs / source.name)
    for name, value in dev.overrides.items():
        (sysfs / name).write_text(value if value.endswith("\n") else value + "\n")
    if "config" not in dev.overrides:  # not in the fixture: derived from its values
        (sysfs / "config").write_bytes(config_space(sysfs))
    if "modalias" not in dev.overrides:
        (sysfs / "modalias").write_text(modalias(sysfs))
    if dev.driver:
        (root / "sys/bus/pci/drivers" / dev.driver).mkdir(parents=True, exist_ok=True)
        _symlink(f"../../drivers/{dev.driver}", sysfs / "driver")
    if dev.iommu_group is not None:
        group = root / "sys/kernel/iommu_groups" / str(dev.iommu_group)
        _symlink(f"../../../../kernel/iommu_groups/{dev.iommu_group}", sysfs / "iommu_group")
        _symlink(f"../../../../bus/pci/devices/{dev.address}", group / "devices" / dev.address)


def build_host_root(
    dest: str | os.PathLike,
    devices: tuple[FakePciDevice, ...] = (FakePciDevice("0000:38:00.0"),),
    tdx_enabled: bool = True,
    tdx_firmware: bool = True,
    ovmf_file: str | os.PathLike | None = None,
) -> HostRoot:
    """Write a fake host root at ``dest`` (replacing one already there)."""
    root = Path(dest)
    if root.exists():
        shutil.rmtree(root)
    (root / "proc").mkdir(parents=True)
    (root / "proc/cpuinfo").write_text(CPUINFO)
    (root / "proc/cmdline").write_text(CMDLINE)
    params = root / "sys/module/kvm_intel/parameters"
    params.mkdir(parents=True)
    (params / "tdx").write_text("Y\n" if tdx_enabled else "N\n")
    for dev in devices:
        _add_pci_device(root, dev)
    if tdx_firmware:
        firmware = root / "usr/share/qemu/firmware"
        firmware.mkdir(parents=True)
        shutil.copyfile(_data() / "60-edk2-x86_64-inteltdx.json",
                        firmware / "60-edk2-x86_64-inteltdx.json")
        ovmf = root / TDX_OVMF.lstrip("/")
        if ovmf_file:  # the real firmware file (the simulated host links the forky one)
            _symlink(str(ovmf_file), ovmf)
        else:
            ovmf.parent.mkdir(parents=True, exist_ok=True)
            ovmf.write_bytes(b"")
    return HostRoot(root)


# The simulated host's device tree: a host that is ready to run TDs, beyond
# build_host_root's TDX-on CPU and H100 with vfio and iommufd loaded and the GPU's
# cdev. Its /etc, /usr and /var are those of the forky root that runs its libvirt
# (tdxvirt.sim.onehost puts the two together, as the daemon's namespace does).
SIM_HOST_VERSION = "6"


# Where the kernel puts a PCI device and where /sys/bus/pci/devices links to it. The
# simulated host's GPUs sit there, as on a real host, so libvirt's node-device driver
# (libudev) finds them: it takes devices below /sys/devices only, each with a uevent.
PCI_ROOT_BUS = "sys/devices/pci0000:00"


def _uevent(sysfs: Path, driver: str | None) -> str:
    """The kernel's uevent variables of a PCI device (drivers/pci/pci-driver.c)."""
    def value(name: str) -> int:
        return int((sysfs / name).read_text().strip(), 16)

    lines = [f"DRIVER={driver}"] if driver else []
    lines += [f"PCI_CLASS={value('class'):04X}",
              f"PCI_ID={value('vendor'):04X}:{value('device'):04X}",
              f"PCI_SUBSYS_ID={value('subsystem_vendor'):04X}:{value('subsystem_device'):04X}",
              f"PCI_SLOT_NAME={sysfs.name}",
              f"MODALIAS={(sysfs / 'modalias').read_text().strip()}"]
    return "\n".join(lines) + "\n"


def _as_in_the_kernel(root: Path, dev: FakePciDevice) -> None:
    """Move a device built by _add_pci_device below the PCI root bus, as the kernel lays
    it out: /sys/bus/pci/devices/ADDR a link to it, its links relative to there, and
    its uevent and subsystem."""
    listed = root / "sys/bus/pci/devices" / dev.address
    sysfs = root / PCI_ROOT_BUS / dev.address
    sysfs.parent.mkdir(parents=True, exist_ok=True)
    listed.rename(sysfs)
    _symlink(f"../../../devices/pci0000:00/{dev.address}", listed)
    _symlink("../../../bus/pci", sysfs / "subsystem")
    if dev.driver:
        _symlink(f"../../../bus/pci/drivers/{dev.driver}", sysfs / "driver")
    if dev.iommu_group is not None:
        _symlink(f"../../../kernel/iommu_groups/{dev.iommu_group}", sysfs / "iommu_group")
        _symlink(f"../../../../devices/pci0000:00/{dev.address}",
                 root / "sys/kernel/iommu_groups" / str(dev.iommu_group) / "devices" / dev.address)
    (sysfs / "uevent").write_text(_uevent(sysfs, dev.driver))


def vfio_cdevs(devices: tuple[FakePciDevice, ...]) -> dict[str, str]:
    """Each vfio-pci device's vfio cdev name (vfio0, vfio1, ... in address order), as the
    kernel numbers them when iommufd is loaded."""
    bound = sorted(d.address for d in devices if d.driver == "vfio-pci")
    return {address: f"vfio{i}" for i, address in enumerate(bound)}


def build_sim_host(dest: str | os.PathLike, daemon_root: str | os.PathLike,
                   board: str | None = None) -> HostRoot:
    from . import boards

    board = board or boards.DEFAULT_BOARD
    devices = boards.devices(board)
    model = boards.BOARDS[board].cpu_model
    daemon = Path(daemon_root)
    host = build_host_root(dest, devices=devices, ovmf_file=daemon / TDX_OVMF.lstrip("/"))
    root = host.base
    if model:
        (root / "proc/cpuinfo").write_text(
            CPUINFO.replace("Intel(R) Xeon(R) Platinum 8480+", model).replace(
                "\n\n", f"\naddress sizes\t: {boards.ADDRESS_SIZES}\n\n"))
    for dev in devices:
        _as_in_the_kernel(root, dev)
    modules = ("vfio", "vfio_pci", "vfio_pci_core", "iommufd", "kvm", "kvm_intel")
    for module in modules:
        (root / "sys/module" / module).mkdir(parents=True, exist_ok=True)
    # /proc/modules' fields (name size refcount users state address); only names are read
    (root / "proc/modules").write_text("".join(f"{m} 0 0 - Live 0x0000000000000000\n"
                                               for m in reversed(modules)))
    (root / "dev/vfio/devices").mkdir(parents=True)
    for node in ("dev/vfio/vfio", "dev/iommu"):
        (root / node).write_text("")  # stand-ins for character devices: only their presence is read
    for address, cdev in vfio_cdevs(devices).items():
        (root / "dev/vfio/devices" / cdev).write_text("")
        (root / "sys/bus/pci/devices" / address / "vfio-dev" / cdev).mkdir(parents=True)
    for directory in ("etc/modprobe.d", "etc/udev/rules.d"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / ".tdxvirt-sim-version").write_text(f"{SIM_HOST_VERSION} {board}\n")
    return host
