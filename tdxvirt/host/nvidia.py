"""NVIDIA device identities: which PCI devices are GPUs or NVSwitches we pass through."""

from __future__ import annotations

from ..errors import InputError
from .pci import PciDevice, vendor_devices
from .root import HostRoot

NVIDIA_VENDOR = 0x10DE
NVSWITCH_IDS = {0x22A3: "NVSwitch"}

# Device ids from NVIDIA's published lists (see reference/tdx-stack.md).
GPU_MODELS = {
    0x2313: "H100",
    0x2321: "H100 NVL",
    0x2322: "H800",
    0x2324: "H800",
    0x2328: "H20",
    0x2329: "H20",
    0x2330: "H100 SXM5 80GB",
    0x2331: "H100 PCIe",
    0x2335: "H200",
    0x2336: "H100",
    0x2337: "H100",
    0x2338: "H100",
    0x2339: "H100",
    0x233A: "H800",
    0x233B: "H200",
    0x233D: "H100",
    0x2342: "GH200",  # NVIDIA's gpu-admin-tools table; a Hopper (H100-class) GPU
}
HOPPER = frozenset(GPU_MODELS)
# Blackwell, as NVIDIA's gpu-admin-tools 2025.11.21 names them (gpu/devid_names.py).
BLACKWELL_MODELS = {
    0x2901: "B200",
    0x2941: "GB200",
    0x3182: "B300",
    0x31A1: "GB300",
    0x31C2: "GB300",
    0x2BB1: "RTX PRO 6000",
    0x2BB4: "RTX PRO 6000",
    0x2BB5: "RTX PRO 6000 Server Edition",
}
GPU_MODELS.update(BLACKWELL_MODELS)
HOPPER_GEN, BLACKWELL_GEN = "Hopper", "Blackwell"

# Memory BAR sizes of known devices, for hosts whose BARs cannot be read here: libvirt's
# node devices do not report them (tdxvirt.facts.libvirt). Only sizes read from a real
# device: 0x2330 from the H100 SXM5 80GB whose sysfs resource file is
# tdxvirt/sim/data/h100-sxm5-80gb/sysfs/resource (BAR0 16 MiB, BAR2 128 GiB, BAR4 32 MiB);
# 0x2335 from the H200 SXM 141GB of tdxvirt/sim/data/h200-sxm-141gb/README.md (BAR0
# 16 MiB, BAR2 256 GiB, BAR4 32 MiB). Any other device (0x233b, the other H200, too) is
# unknown: `define --mmio-window` then says how large the window is.
KNOWN_BAR_SIZES = {
    0x2330: (16 << 20, 128 << 30, 32 << 20),
    0x2335: (16 << 20, 256 << 30, 32 << 20),
}


# Blackwell's large BAR is resizable, so no constant is right for every host: a local
# device's sizes are always read from its sysfs resource file. For a remote host (libvirt
# reports no BARs) these are the sizes users measured and published, each with its
# source; the small BARs beside it are bounded by SMALL_BARS, which only matters where
# it tips the power-of-two window (it does not: 256 GiB + 1 GiB and 256 GiB + 96 MiB
# both need 512 GiB).
MEASURED_LARGE_BAR = {
    0x2901: (256 << 30, "B200: 256 GiB, measured on 8xB200 HGX TDX hosts (issue 28's sources)"),
    0x3182: (512 << 30, "B300: 512 GiB, measured on 8xB300 HGX hosts (issue 28's sources)"),
    0x2BB5: (128 << 30, "RTX PRO 6000 Server Edition: 128 GiB (issue 28's sources)"),
}
SMALL_BARS = 1 << 30  # BAR0 (registers) and the remaining BARs of one GPU, an upper bound


def known_bar_sizes(vendor: int, device: int) -> tuple[int, ...] | None:
    """The memory BAR sizes tdxvirt knows for this device id, or None."""
    if vendor != NVIDIA_VENDOR:
        return None
    if device in MEASURED_LARGE_BAR:
        return (MEASURED_LARGE_BAR[device][0], SMALL_BARS)
    return KNOWN_BAR_SIZES.get(device)


def generation(device: PciDevice) -> str | None:
    """Hopper, Blackwell, or None (an NVSwitch, an id tdxvirt does not know)."""
    if kind_of(device) != GPU:
        return None
    if device.device in BLACKWELL_MODELS:
        return BLACKWELL_GEN
    return HOPPER_GEN if device.device in HOPPER else None


# 0x0300 VGA and 0x0302 3D controller; the H100 SXM5 reports 0x0302.
_GPU_CLASSES = {0x0300, 0x0302}
# NVSwitches report "other bridge" (0x0680), which is also how NVIDIA's tool finds them.
_NVSWITCH_CLASS = 0x0680


GPU = "GPU"
NVSWITCH = "NVSwitch"


def kind_of(device: PciDevice) -> str | None:
    """GPU, NVSwitch, or None for anything else (an audio function, another vendor).

    The one place that decides what tdxvirt passes through and manages."""
    if device.vendor != NVIDIA_VENDOR:
        return None
    if device.device in NVSWITCH_IDS or (device.pci_class >> 8) == _NVSWITCH_CLASS:
        return NVSWITCH
    if (device.pci_class >> 8) in _GPU_CLASSES:
        return GPU
    return None


def is_nvswitch(device: PciDevice) -> bool:
    return kind_of(device) == NVSWITCH


def is_passthrough_candidate(device: PciDevice) -> bool:
    """An NVIDIA GPU (VGA or 3D class) or NVSwitch."""
    return kind_of(device) is not None


def model_name(device: PciDevice) -> str:
    """Model name from the device id; an unknown id is shown as hex, never dropped."""
    names = {**GPU_MODELS, **NVSWITCH_IDS}
    if device.device not in names and is_nvswitch(device):
        return "NVSwitch"
    return names.get(device.device, f"NVIDIA {device.device:#06x}")


def require_gpu(device: PciDevice) -> None:
    if not is_passthrough_candidate(device):
        raise InputError(
            f"{device.address} is not an NVIDIA GPU or NVSwitch (vendor "
            f"{device.vendor:#06x}, class {device.pci_class:#08x}); pass the address "
            "of the GPU itself, as `lspci -D -d 10de:` shows it"
        )


def nvidia_devices(root: HostRoot) -> list[PciDevice]:
    """Every NVIDIA GPU and NVSwitch under the host root, in address order."""
    return [d for d in vendor_devices(root, NVIDIA_VENDOR) if is_passthrough_candidate(d)]
