"""Reading the GPUs a user names; what counts as a GPU is tdxvirt.host.nvidia's call."""

from __future__ import annotations

from typing import Iterable

from ..errors import InputError
from ..host import HostRoot
from ..host.nvidia import GPU, GPU_MODELS, NVSWITCH, kind_of, model_name, nvidia_devices  # noqa: F401  (GPU, NVSWITCH, nvidia_devices: re-exported)
from ..host.pci import PciDevice, read_device
from ..pci import PciAddress


def model(device: PciDevice) -> str:
    return model_name(device)


def is_hopper(device: PciDevice) -> bool:
    """A Hopper GPU (H100, H200, H800, H20): the GPUs of an HGX board with PPCIe."""
    return kind_of(device) == GPU and device.device in GPU_MODELS


def read_targets(root: HostRoot, texts: Iterable[str]) -> list[PciDevice]:
    """The GPUs / NVSwitches a user named, parsed and checked; duplicates dropped.

    Raises InputError (bad address, not an NVIDIA GPU or NVSwitch) or NotFoundError
    (no such device) before anything is changed.
    """
    addresses: list[PciAddress] = []
    for text in texts:
        address = PciAddress.parse(text)
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise InputError("no device given: name one or more GPUs, e.g. 38:00.0 "
                         "(`tdxvirt gpu list` shows them)")
    devices = [read_device(root, address) for address in addresses]
    for device in devices:
        if kind_of(device) is None:
            raise InputError(
                f"{device.address} is not an NVIDIA GPU or NVSwitch (vendor "
                f"{device.vendor:#06x}, class {device.pci_class:#08x}); name the GPU "
                "itself (`tdxvirt gpu list` shows them): its IOMMU group moves with it"
            )
    return devices
