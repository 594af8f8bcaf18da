"""This machine's facts (the URI names no host): read through the HostRoot."""

from __future__ import annotations

import os
from pathlib import Path

from ..host import HostRoot, iommu, nvidia
from ..host.pci import PciDevice, read_device
from ..pci import PciAddress
from ..virt.conn import host_of
from . import HostFacts


class LocalFacts(HostFacts):
    remote = False
    where = "this host"

    def __init__(self, host: HostRoot, uri: str, conn=None):
        self.host = host
        self.uri = uri
        self.conn = conn  # only for libvirt's product names (gpu list)
        self.lock_host = host_of(uri)

    def __repr__(self) -> str:
        return f"LocalFacts({self.host!r}, {self.uri!r})"

    def device(self, address: PciAddress) -> PciDevice:
        return read_device(self.host, address)

    def nvidia_devices(self) -> list[PciDevice]:
        return nvidia.nvidia_devices(self.host)

    def group_members(self, device: PciDevice) -> list[PciAddress]:
        if device.iommu_group is None:
            return []
        return iommu.group_members(self.host, device.iommu_group)

    def is_bridge(self, device: PciDevice) -> bool:
        return iommu.is_bridge(self.host, device.address, device.pci_class)

    def libvirt_devices(self) -> dict[str, PciDevice]:
        if self.conn is None:
            return {}
        from .libvirt import pci_node_devices

        return pci_node_devices(self.conn)

    def tdx_enabled(self) -> bool | None:
        from ..virt.dialect import host_tdx_enabled

        return host_tdx_enabled(self.host)

    def tdx_problem(self) -> str | None:
        if self.tdx_enabled() is False:
            return ("TDX is not enabled in KVM on this host; load kvm_intel with tdx=on "
                    "(`tdxvirt host setup`)")
        return None

    def tdx_firmware(self, dialect: str) -> str | None:
        from ..host.firmware import find_tdx_ovmf

        return find_tdx_ovmf(self.host)

    def firmware_exists(self, path: str) -> bool | None:
        # Firmware is a host fact (the host root models it).
        return self.host.exists(path)

    def disk_exists(self, path: str) -> bool | None:
        # Disk images are the user's files, which libvirt opens by their real path: on
        # this machine, or inside a whole host's root (the simulated host's daemon).
        return self.host.exists(path) if self.host.files_in_root else os.path.exists(path)

    def program_installed(self, name: str) -> bool | None:
        return any(self.host.exists(f"{directory}/{name}")
                   for directory in ("/usr/bin", "/usr/sbin", "/bin", "/sbin"))

    def bridge_exists(self, name: str) -> bool | None:
        # only this machine's own /sys tells: the simulated host's bridges live in its
        # network namespace, a --host-root tree has none
        if self.host.base != Path("/") or self.host.mounts:
            return None
        return os.path.isdir(f"/sys/class/net/{name}/bridge")

    def check_disk(self, spec) -> list[str]:
        """The user's --disk / --image read as the declared format (never guessed), and
        refused with a backing file unless --allow-backing-file (policy.inspect_image)."""
        from ..domain.policy import inspect_image

        for option, path in (("--disk", spec.disk), ("--image", spec.image)):
            if path:
                self._require_on_host(option, path)
        if spec.disk:
            return inspect_image(spec.disk, spec.disk_format, "--disk", spec.allow_backing_file)
        if spec.image:
            return inspect_image(spec.image, spec.disk_format, "--image", spec.allow_backing_file)
        return []

    def _require_on_host(self, option: str, path: str) -> None:
        """A whole host in a root of its own (the simulated host) shares only some of this
        machine's directories: a file elsewhere exists here but not for its libvirt."""
        if not self.host.files_in_root or self.host.exists(path) or not os.path.exists(path):
            return
        from ..errors import InputError

        shared = ", ".join(getattr(self.host, "shared", ())) or "none of its directories"
        raise InputError(f"{option} {path} is on this machine but not on the simulated host, "
                         f"which shares {shared} with it; move or copy the file there")

    def paths_from_config(self, config) -> tuple[str | None, str | None, list[str]]:
        return config.ovmf, config.qemu, []

    def recorded_builds(self) -> dict:
        from ..build.artifacts import recorded

        return recorded()

    def mode_reader(self, tool_path: str | None = None):
        from ..gpu.modes import mode_reader

        return mode_reader(self.host, tool_path)

    def storage_removal(self, name: str, xml: str, recorded: dict, config=None):
        from ..domain.storage_paths import StorageRemoval

        return StorageRemoval(name, xml, self.uri, recorded, config)
