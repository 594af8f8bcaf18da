"""The NVLink fabric of HGX B200/B300 boards, as the host sees it.

On NVLink 5 boards the NVLink switches are no PCIe device of a TD: the host manages
them through ConnectX functions (15b3:1021) with NVIDIA's Fabric Manager and NVLink
subnet manager (NVLSM). Blackwell multi-GPU passthrough (MPT) needs both running before
CC is set, because NVLink 5 GPUs must be reset after Fabric Manager starts and the CC
switch's reset is that reset. `host check` (tdxvirt.doctor.gpuhost) and `gpu cc-mode`
(tdxvirt.gpu.ccmode) read the board and the services here, the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import nvidia
from .pci import PciDevice, vendor_devices
from .procs import Process, find_processes
from .root import HostRoot

SWITCH_MANAGEMENT = (0x15B3, 0x1021)  # ConnectX function managing HGX B200/B300 NVLink switches
FABRIC_MANAGER = ("nv-fabricmanager", "nv-fabricmanage")  # /proc's comm keeps 15 characters
SUBNET_MANAGER = ("nvlsm",)


@dataclass(frozen=True)
class Service:
    label: str  # host check's row name
    title: str  # how a message names it
    names: tuple[str, ...]  # its process names in /proc/<pid>/comm


FABRIC_SERVICES = (Service("fabric manager", "Fabric Manager (nv-fabricmanager)", FABRIC_MANAGER),
                   Service("nvlink subnet manager", "the NVLink subnet manager (nvlsm)",
                           SUBNET_MANAGER))


def switch_management(root: HostRoot) -> list[PciDevice]:
    """The ConnectX switch-management functions under the host root, in address order."""
    return [d for d in vendor_devices(root, SWITCH_MANAGEMENT[0])
            if (d.vendor, d.device) == SWITCH_MANAGEMENT]


def running(root: HostRoot, service: Service) -> Process | None:
    """The service's first process on the host, or None."""
    found = find_processes(root, service.names)
    return found[0] if found else None


@dataclass(frozen=True)
class NvlinkBoard:
    """An HGX board whose NVLink switches the host manages: every Blackwell GPU on it
    (one board per host) and the ConnectX functions the switches are managed through."""

    gpus: tuple[PciDevice, ...]
    management: tuple[PciDevice, ...]


def nvlink_board(root: HostRoot, devices: list[PciDevice]) -> NvlinkBoard | None:
    """The board when ``devices`` include a Blackwell GPU and the host has ConnectX
    switch management; None otherwise (a Hopper host, a Blackwell GPU of its own)."""
    if not any(nvidia.generation(device) == nvidia.BLACKWELL_GEN for device in devices):
        return None
    management = switch_management(root)
    if not management:
        return None
    gpus = [d for d in nvidia.nvidia_devices(root) if nvidia.generation(d) == nvidia.BLACKWELL_GEN]
    return NvlinkBoard(tuple(gpus), tuple(management))
