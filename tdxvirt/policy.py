"""Every decision between a TDSpec and the domain XML, in one place.

Templates receive a finished :class:`DomainPlan` and only loop and branch over it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from . import __version__
from .dialect import LIBVIRT_NATIVE_TDX, version_text  # noqa: F401  (re-exported)
from .errors import InputError
from .host.pci import PciDevice
from .pci import PciAddress
from .spec import HUGEPAGES, TDSpec
from .units import MIB, human

LIBVIRT_HOSTDEV_IOMMUFD = 12_001_000

# TDX memory should be 2 MiB aligned: less costs measured performance (Canonical).
MEMORY_ALIGN = 2 * MIB
# OVMF's own default 64-bit MMIO window; never ask for less.
MIN_MMIO_MB = 32 * 1024
# The only fw_cfg name OVMF reads for the window (X-PciMmio64 is silently ignored).
# libvirt's qemu driver refuses opt/ovmf/ names in <sysinfo type='fwcfg'> ("That
# firmware name is reserved"; its test driver accepts them), so the entry goes to
# QEMU as -fw_cfg through <qemu:commandline>, in every dialect.
MMIO_FWCFG_NAME = "opt/ovmf/X-PciMmio64Mb"


@dataclass(frozen=True)
class Hostdev:
    source: PciAddress
    guest_bus: int  # index of the pcie-root-port it sits on
    kind: str = "gpu"  # or "nvswitch"


@dataclass(frozen=True)
class Disk:
    path: str
    format: str
    overlay_base: str | None = None  # set when tdxvirt creates path as an overlay
    base_format: str | None = None


@dataclass(frozen=True)
class DomainPlan:
    name: str
    dialect: str  # native, canonical, qemu-args or plain
    virt_type: str
    vcpus: int
    memory_kib: int
    loader: str | None
    emulator: str | None
    mmio_mb: int
    policy_hex: str
    mr_config_id: str | None
    mr_owner: str | None
    mr_owner_config: str | None
    qgs_path: str | None
    qgs_vsock: tuple[int, int] | None
    hostdevs: tuple[Hostdev, ...]
    managed: bool
    iommufd: bool
    split_irqchip: bool
    disk: Disk | None
    kernel: str | None
    initrd: str | None
    cmdline: str | None
    network: str
    ssh_port: int
    vsock: bool
    hugepage_kib: int | None
    numa_nodeset: str | None
    seed: str | None = None  # the cloud-init seed ISO tdxvirt creates
    qemu_args: tuple[str, ...] = ()
    tdxvirt_version: str = __version__
    warnings: tuple[str, ...] = field(default=())

    @property
    def tdx(self) -> bool:
        return self.dialect != "plain"

    @property
    def root_ports(self) -> tuple[int, ...]:
        return tuple(h.guest_bus for h in self.hostdevs)

    @property
    def gpus(self) -> tuple[Hostdev, ...]:
        return tuple(h for h in self.hostdevs if h.kind == "gpu")


def align_memory(size: int) -> tuple[int, str | None]:
    aligned = -(-size // MEMORY_ALIGN) * MEMORY_ALIGN
    if aligned == size:
        return size, None
    return aligned, f"memory {size} bytes rounded up to {human(aligned)} (TDs want 2 MiB alignment)"


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


def numa_nodeset(gpus: list[PciDevice]) -> tuple[str | None, str | None]:
    """The GPUs' NUMA nodes as a libvirt nodeset, and a warning when none is known."""
    nodes = sorted({g.numa_node for g in gpus if g.numa_node is not None})
    if not nodes:
        return None, "--numa auto: the GPUs' NUMA node is unknown (sysfs numa_node -1); no NUMA placement"
    return nodeset_text(nodes), None


def nodeset_text(nodes: list[int]) -> str:
    """libvirt's own bitmap format ("0-2,4"), so its read-back is identical."""
    runs: list[list[int]] = []
    for node in sorted(set(nodes)):
        if runs and node == runs[-1][1] + 1:
            runs[-1][1] = node
        else:
            runs.append([node, node])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def mmio_args(mmio_mb: int) -> tuple[str, ...]:
    return ("-fw_cfg", f"name={MMIO_FWCFG_NAME},string={mmio_mb}")


def qemu_tdx_args(spec: TDSpec) -> tuple[str, ...]:
    """The qemu-args dialect: what libvirt cannot say for a TD without TDX XML.

    libvirt itself already emits the firmware (``<loader type='rom'>`` is ``-bios``) and
    the split irqchip (``<ioapic driver='qemu'/>`` is ``kernel_irqchip=split``), so only
    the tdx-guest object and the machine property naming it are added. The second
    ``-machine`` names no machine type: QEMU merges every ``-machine`` option into one,
    so libvirt's machine type and properties stay as libvirt chose them."""
    tdx_object = {"qom-type": "tdx-guest", "id": "tdx", "attributes": spec.policy}
    for key, value in (("mrconfigid", spec.mr_config_id), ("mrowner", spec.mr_owner),
                       ("mrownerconfig", spec.mr_owner_config)):
        if value:
            tdx_object[key] = value
    if spec.qgs:
        tdx_object["quote-generation-socket"] = (
            {"type": "vsock", "cid": str(spec.qgs.cid), "port": str(spec.qgs.port)}
            if spec.qgs.is_vsock else {"type": "unix", "path": spec.qgs.path})
    return (
        "-object", json.dumps(tdx_object, separators=(",", ":")),  # JSON: no option-string quoting
        "-machine", "confidential-guest-support=tdx",
    )


def _check_quote_service(spec: TDSpec, dialect: str) -> None:
    if spec.qgs and spec.qgs.is_vsock and dialect == "native":
        raise InputError(
            "--qgs vsock:CID:PORT: upstream libvirt only takes a unix socket path for the "
            "quote service; give --qgs /path/to/qgs.socket, or --dialect canonical/qemu-args"
        )


def overlay_path(spec: TDSpec, overlay_dir: str) -> str:
    return os.path.join(overlay_dir, f"{spec.name}.qcow2")


def seed_path(spec: TDSpec, overlay_dir: str | None) -> str | None:
    if not spec.cloud_init:
        return None
    if overlay_dir is None:
        raise InputError("--cloud-init needs a directory for the seed; set defaults.overlay_dir")
    return os.path.join(overlay_dir, f"{spec.name}-seed.iso")


def plan_disk(spec: TDSpec, overlay_dir: str | None) -> Disk | None:
    if spec.disk:
        return Disk(spec.disk, image_format(spec.disk))
    if spec.image:
        if overlay_dir is None:
            raise InputError("--image needs an overlay directory; set defaults.overlay_dir")
        return Disk(overlay_path(spec, overlay_dir), "qcow2", spec.image, image_format(spec.image))
    return None


def plan_domain(
    spec: TDSpec,
    *,
    gpus: list[PciDevice],
    switches: list[PciDevice] = (),
    dialect: str,
    libvirt_version: int,
    loader: str | None,
    emulator: str | None = None,
    overlay_dir: str | None = None,
) -> DomainPlan:
    """Decide everything; ``dialect`` is 'plain' for --no-tdx."""
    _check_quote_service(spec, dialect)
    memory, memory_warning = align_memory(spec.memory)
    warnings = [memory_warning]
    if spec.policy & 1:
        warnings.append("TDX debug policy bit set: the host can read this TD's memory; "
                        "never use it in production")
    nodeset = None
    if spec.numa_auto:
        nodeset, numa_warning = numa_nodeset(gpus)
        warnings.append(numa_warning)
    devices = [*gpus, *switches]
    mmio_mb = mmio_window_mb(devices)
    hostdevs = tuple(
        # Root port index i (1-based; 0 is pcie-root) carries device i.
        Hostdev(d.address, index, "nvswitch" if d in switches else "gpu")
        for index, d in enumerate(devices, start=1)
    )
    qgs = spec.qgs if dialect != "plain" else None
    return DomainPlan(
        name=spec.name,
        dialect=dialect,
        virt_type=spec.virt_type,
        vcpus=spec.vcpus,
        memory_kib=memory // 1024,
        loader=loader,
        emulator=emulator,
        mmio_mb=mmio_mb,
        policy_hex=f"{spec.policy:#x}",
        mr_config_id=spec.mr_config_id,
        mr_owner=spec.mr_owner,
        mr_owner_config=spec.mr_owner_config,
        qgs_path=qgs.path if qgs and not qgs.is_vsock else None,
        qgs_vsock=(qgs.cid, qgs.port) if qgs and qgs.is_vsock else None,
        hostdevs=hostdevs,
        managed=spec.managed,
        iommufd=libvirt_version >= LIBVIRT_HOSTDEV_IOMMUFD and dialect in ("native", "plain"),
        # TDX needs the split irqchip; a plain TCG guest cannot have it.
        split_irqchip=dialect != "plain" or spec.virt_type == "kvm",
        disk=plan_disk(spec, overlay_dir),
        seed=seed_path(spec, overlay_dir),
        kernel=spec.kernel,
        initrd=spec.initrd,
        cmdline=spec.cmdline,
        network=spec.network,
        ssh_port=spec.ssh_port,
        vsock=spec.vsock,
        hugepage_kib=HUGEPAGES[spec.hugepages] if spec.hugepages else None,
        numa_nodeset=nodeset,
        qemu_args=(qemu_tdx_args(spec) if dialect == "qemu-args" else ()) + mmio_args(mmio_mb),
        warnings=tuple(w for w in warnings if w),
    )
