"""VFIO and iommufd: modules, device nodes, per-device cdevs, legacy DMA limits."""

from __future__ import annotations

from ..domain.policy import LIBVIRT_HOSTDEV_IOMMUFD
from .check import FAIL, OK, SKIP, WARN, Check
from .context import Context
from .gpus import local_gpus

DMA_LIMIT = "/sys/module/vfio_iommu_type1/parameters/dma_entry_limit"
WANTED_DMA_LIMIT = 0x200000  # Canonical's value for large TDs


def uses_iommufd(ctx: Context) -> bool:
    """libvirt >= 12.1 passes hostdevs through iommufd when /dev/iommu exists."""
    version = ctx.libvirt_version
    return (version is not None and version >= LIBVIRT_HOSTDEV_IOMMUFD
            and ctx.root.exists("/dev/iommu"))


def _modules(ctx: Context) -> Check:
    name = "vfio: modules"
    missing = [m for m in ("vfio", "vfio_pci") if not ctx.root.exists(f"/sys/module/{m}")]
    if not missing:
        return Check(name, OK, "vfio and vfio_pci loaded")
    return Check(name, FAIL, f"not loaded: {', '.join(missing)}",
                 "`modprobe vfio-pci` (and a kernel with CONFIG_VFIO_PCI)")


def _nodes(ctx: Context) -> list[Check]:
    checks = []
    if ctx.root.exists("/dev/vfio"):
        entries = ctx.root.listdir("/dev/vfio")
        checks.append(Check("vfio: /dev/vfio", OK, "/dev/vfio: " + (" ".join(entries) or "empty")))
    else:
        checks.append(Check("vfio: /dev/vfio", FAIL, "no /dev/vfio", "`modprobe vfio-pci`"))
    iommufd_wanted = (ctx.libvirt_version or 0) >= LIBVIRT_HOSTDEV_IOMMUFD
    if ctx.root.exists("/dev/iommu"):
        checks.append(Check("vfio: /dev/iommu", OK, "/dev/iommu present (iommufd)"))
    elif iommufd_wanted:
        checks.append(Check("vfio: /dev/iommu", FAIL,
                            "no /dev/iommu, but libvirt >= 12.1 passes GPUs through iommufd",
                            "`modprobe iommufd` (kernel with CONFIG_IOMMUFD)"))
    else:
        checks.append(Check("vfio: /dev/iommu", WARN,
                            "no /dev/iommu: GPUs go through legacy VFIO groups",
                            "`modprobe iommufd` (kernel with CONFIG_IOMMUFD) for iommufd"))
    return checks


def _cdevs(ctx: Context) -> Check:
    name = "vfio: device cdevs"
    bound = [g for g in local_gpus(ctx) if g.driver == "vfio-pci"]
    if not bound:
        return Check(name, SKIP, "no NVIDIA GPU bound to vfio-pci yet")
    problems, found = [], []
    for gpu in bound:
        cdevs = ctx.root.listdir(f"/sys/bus/pci/devices/{gpu.address}/vfio-dev")
        if not cdevs:
            problems.append(f"{gpu.address} has no vfio-dev cdev")
            continue
        node = f"/dev/vfio/devices/{cdevs[0]}"
        if ctx.root.exists(node):
            found.append(f"{gpu.address} -> {node}")
        else:
            problems.append(f"{gpu.address}: {node} missing")
    if problems:
        return Check(name, FAIL, "; ".join(problems),
                     "a kernel with CONFIG_VFIO_DEVICE_CDEV; udev must create "
                     "/dev/vfio/devices/vfioN")
    return Check(name, OK, "; ".join(found))


def _dma_limit(ctx: Context) -> Check:
    name = "vfio: dma_entry_limit"
    if uses_iommufd(ctx):
        return Check(name, SKIP, "iommufd in use: legacy VFIO's DMA limit does not apply")
    value = ctx.root.read_value(DMA_LIMIT)
    if value is None:
        return Check(name, SKIP, "vfio_iommu_type1 not loaded")
    try:
        limit = int(value, 0)
    except ValueError:
        return Check(name, WARN, f"unreadable value {value!r}")
    if limit >= WANTED_DMA_LIMIT:
        return Check(name, OK, f"{limit:#x}")
    return Check(name, WARN, f"{limit:#x}: large TDs with GPUs run out of DMA mappings "
                 "under legacy VFIO", "`tdxvirt host setup --legacy-vfio` (0x200000), then "
                 "reload vfio_iommu_type1 or reboot")


def checks(ctx: Context) -> list[Check]:
    if skipped := ctx.skip_if_remote("vfio"):
        return [skipped]
    return [_modules(ctx), *_nodes(ctx), _cdevs(ctx), _dma_limit(ctx)]
