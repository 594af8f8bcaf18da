"""Every decision between a TDSpec and the domain XML, in one place.

Templates receive a finished :class:`DomainPlan` and only loop and branch over it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import __version__
from .host.pci import PciDevice
from .pci import PciAddress
from .spec import TDSpec
from .units import MIB, human

# libvirt versions as getLibVersion() encodes them (major * 1e6 + minor * 1e3).
LIBVIRT_NATIVE_TDX = 11_006_000
LIBVIRT_HOSTDEV_IOMMUFD = 12_001_000

# TDX memory should be 2 MiB aligned: less costs measured performance (Canonical).
MEMORY_ALIGN = 2 * MIB
# OVMF's own default 64-bit MMIO window; never ask for less.
MIN_MMIO_MB = 32 * 1024
# The only fw_cfg name OVMF reads for the window (X-PciMmio64 is silently ignored).
MMIO_FWCFG_NAME = "opt/ovmf/X-PciMmio64Mb"


def version_text(version: int) -> str:
    return f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}"


@dataclass(frozen=True)
class Hostdev:
    source: PciAddress
    guest_bus: int  # index of the pcie-root-port it sits on


@dataclass(frozen=True)
class DomainPlan:
    name: str
    vcpus: int
    memory_kib: int
    loader: str
    mmio_mb: int
    policy_hex: str
    hostdevs: tuple[Hostdev, ...]
    managed: bool
    iommufd: bool
    image: str | None
    image_format: str | None
    tdxvirt_version: str = __version__
    warnings: tuple[str, ...] = field(default=())

    @property
    def root_ports(self) -> tuple[int, ...]:
        return tuple(h.guest_bus for h in self.hostdevs)


def align_memory(size: int) -> tuple[int, str | None]:
    aligned = -(-size // MEMORY_ALIGN) * MEMORY_ALIGN
    if aligned == size:
        return size, None
    return aligned, (
        f"memory {size} bytes rounded up to {human(aligned)} (TDs want 2 MiB alignment)"
    )


def mmio_window_mb(devices: list[PciDevice]) -> int:
    """Sum of the passed devices' memory BARs, rounded up to a power of two, in MiB."""
    total_mb = -(-sum(d.mmio_bytes for d in devices) // MIB)
    window = MIN_MMIO_MB
    while window < total_mb:
        window *= 2
    return window


def image_format(path: str) -> str:
    """qcow2 when the file starts with qcow2's magic, raw otherwise."""
    with open(path, "rb") as image:
        return "qcow2" if image.read(4) == b"QFI\xfb" else "raw"


def plan_domain(
    spec: TDSpec, devices: list[PciDevice], libvirt_version: int, loader: str
) -> DomainPlan:
    memory, memory_warning = align_memory(spec.memory)
    return DomainPlan(
        name=spec.name,
        vcpus=spec.vcpus,
        memory_kib=memory // 1024,
        loader=loader,
        mmio_mb=mmio_window_mb(devices),
        policy_hex=f"{spec.policy:#x}",
        # Root port index i (1-based; 0 is pcie-root) carries GPU i.
        hostdevs=tuple(Hostdev(gpu, index) for index, gpu in enumerate(spec.gpus, start=1)),
        managed=spec.managed,
        iommufd=libvirt_version >= LIBVIRT_HOSTDEV_IOMMUFD,
        image=spec.image,
        image_format=None if spec.image is None else image_format(spec.image),
        warnings=tuple(w for w in (memory_warning,) if w),
    )
