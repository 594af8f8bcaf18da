"""The boards the simulated TDX host can have: which PCI devices its device tree holds.

- ``h100`` (the default): one H100 SXM5 at 38:00.0, every sysfs value the real GPU's
  (``data/h100-sxm5-80gb``).
- ``hgx-b200``: an HGX B200 board: eight B200s at the HGX board's GPU addresses, four
  per NUMA node, each in its own IOMMU group and bound to vfio-pci, and the two ConnectX
  functions (15b3:1021) through which the host's Fabric Manager and NVLink subnet
  manager manage the NVLink switches; no NVSwitch is a PCI device of the host, as on
  the real board. It stands on the H100's files with the values that differ: the
  device id NVIDIA's gpu-admin-tools names (B200 0x2901), class 3D controller and the
  large BAR users measured (256 GiB; tdxvirt.host.nvidia.MEASURED_LARGE_BAR). BAR0
  64 MiB and BAR4 32 MiB are assumed (no Blackwell sysfs dump is public); nothing
  depends on them beyond their being small. Fabric Manager and the NVLink subnet
  manager run on it (stand-ins, fabric.py), FM configured as multi-GPU passthrough
  needs it.
- ``hgx-b200-no-fm``: the same board on a host without Fabric Manager installed.

Tests build fake host roots from the same devices (tests/gpu_fakes.py), so the board
the emulated host runs a TD on and the boards the unit tests reason about are one.
"""

from __future__ import annotations

from dataclasses import dataclass

from .hostroot import FakePciDevice

DEFAULT_BOARD = "h100"

_ZERO_BAR = "0x0000000000000000 0x0000000000000000 0x0000000000000000"


def resource(*bars: tuple[int, int]) -> str:
    """A sysfs ``resource`` file with these (start, size) memory BARs, the rest empty."""
    lines = [f"{start:#018x} {start + size - 1:#018x} 0x000000000014220c" for start, size in bars]
    return "\n".join(lines + [_ZERO_BAR] * (7 - len(lines))) + "\n"


BLACKWELL = {"B200": ("0x2901", 256 << 30), "B300": ("0x3182", 512 << 30)}


def blackwell(address: str, group: int, model: str = "B200", driver: str | None = "vfio-pci",
              numa: int = 0) -> FakePciDevice:
    device, large = BLACKWELL[model]
    base = 0x0000_4000_0000_0000 + int(address[5:7], 16) * 0x100_0000_0000
    return FakePciDevice(address, driver=driver, iommu_group=group, overrides={
        "device": device, "class": "0x030200", "numa_node": str(numa),
        "resource": resource((base, 64 << 20), (base + (1 << 40), large), (base + (2 << 40), 32 << 20))})


def connectx_switch_management(address: str, group: int) -> FakePciDevice:
    """A ConnectX function the NVLink switches are managed through on HGX B200/B300
    (15b3:1021; the host's Fabric Manager and NVLink subnet manager use it)."""
    return FakePciDevice(address, driver="mlx5_core", iommu_group=group, overrides={
        "vendor": "0x15b3", "device": "0x1021", "class": "0x020700", "numa_node": "0",
        "resource": resource((0x3000_0000_0000 + int(address[5:7], 16) * 0x200_0000, 32 << 20))})


HGX_GPUS = ("0000:18:00.0", "0000:2a:00.0", "0000:3a:00.0", "0000:5d:00.0",
            "0000:9a:00.0", "0000:ab:00.0", "0000:ba:00.0", "0000:db:00.0")
HGX_B200_SWITCH_MANAGEMENT = ("0000:c1:00.0", "0000:c1:00.1")


def hgx_b200_devices(model: str = "B200", driver: str = "vfio-pci") -> tuple[FakePciDevice, ...]:
    """Eight Blackwell GPUs (four per NUMA node) at HGX_GPUS' addresses, each in its own
    group, and the ConnectX switch-management functions: no NVSwitch PCI device."""
    gpus = tuple(blackwell(a, group=10 + i, model=model, driver=driver, numa=0 if i < 4 else 1)
                 for i, a in enumerate(HGX_GPUS))
    return gpus + tuple(connectx_switch_management(a, group=60 + i)
                        for i, a in enumerate(HGX_B200_SWITCH_MANAGEMENT))


@dataclass(frozen=True)
class Board:
    devices: tuple[FakePciDevice, ...]
    description: str
    # The CPU of the board's host. An HGX B200 host carries two Xeon Platinum 8570
    # (Emerald Rapids: 46 physical address bits, which `host check` compares with the
    # window eight B200s need); the H100 host's line stays as it was (no address sizes
    # line: the check is skipped there, as on a kernel that does not print it).
    cpu_model: str | None = None
    # NVIDIA Fabric Manager and the NVLink subnet manager running on the host, FM
    # configured with PARTITION_RAIL_POLICY=symmetric (fabric.py): what multi-GPU
    # passthrough needs on HGX B200. Stand-ins: NVIDIA's daemons need the hardware.
    fabric_manager: bool = False


HGX_B200 = "HGX B200: eight B200s (18:00.0 ... db:00.0) and the ConnectX switch-management functions"
BOARDS: dict[str, Board] = {
    "h100": Board((FakePciDevice("0000:38:00.0"),), "one H100 SXM5 at 38:00.0"),
    "hgx-b200": Board(hgx_b200_devices(), HGX_B200 + ", Fabric Manager and NVLSM running",
                      "Intel(R) Xeon(R) Platinum 8570", fabric_manager=True),
    "hgx-b200-no-fm": Board(hgx_b200_devices(), HGX_B200 + ", no Fabric Manager installed",
                            "Intel(R) Xeon(R) Platinum 8570"),
}
ADDRESS_SIZES = "46 bits physical, 57 bits virtual"


def devices(board: str) -> tuple[FakePciDevice, ...]:
    return BOARDS[board].devices


def gpus(board: str) -> tuple[str, ...]:
    """The board's GPU addresses (the devices whose class is a display controller)."""
    return tuple(d.address for d in devices(board)
                 if d.overrides.get("class", "0x030200").startswith("0x03"))
