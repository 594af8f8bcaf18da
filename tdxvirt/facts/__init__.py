"""Facts about the host that runs the TD, from the one place that can tell them.

Chosen once, from the libvirt URI (:func:`facts_for`):

- local (:mod:`tdxvirt.facts.local`): the URI names no host (``qemu:///system``,
  ``test+unix:///...``): the TD runs on this machine, whose facts are read through
  the HostRoot (sysfs, QEMU firmware descriptors, files).
- libvirt (:mod:`tdxvirt.facts.libvirt`): the URI names another host
  (``qemu+ssh://gpuhost/system``): every fact comes through that libvirt connection
  (node devices, domain capabilities, storage volumes). Nothing is read from, checked
  on, run on or deleted from this machine; what libvirt cannot tell is asked for (an
  option such as ``--mmio-window`` or ``--ovmf``) or reported unknown (``None``).

define (tdxvirt.lifecycle.assemble), start's preflight (tdxvirt.lifecycle.preflight), the integrity check,
``gpu list``, ``host check``'s GPU rows and ``undefine --remove-storage`` ask a
:class:`HostFacts` and never branch on the URI or read a HostRoot themselves. Both
implementations return the same device record, :class:`tdxvirt.host.pci.PciDevice`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..virt.conn import host_of, is_remote

if TYPE_CHECKING:
    from ..config import Config
    from ..domain.spec import TDSpec
    from ..domain.storage_paths import StorageRemoval
    from ..host import HostRoot
    from ..host.pci import PciDevice
    from ..pci import PciAddress


class HostFacts:
    """What tdxvirt asks about the host that runs the TD. ``None`` answers: unknown."""

    uri: str
    remote: bool
    where: str  # the host in messages: "this host", or "host gpuhost"
    lock_host: str  # the host part of lock keys (tdxvirt.locks): host_of(uri)

    # --- PCI devices --------------------------------------------------------------
    def device(self, address: PciAddress) -> PciDevice:
        """The device at ``address``; NotFoundError (naming the host) when it has none."""
        raise NotImplementedError

    def nvidia_devices(self) -> list[PciDevice]:
        """Every NVIDIA GPU and NVSwitch of the host, in address order."""
        raise NotImplementedError

    def group_members(self, device: PciDevice) -> list[PciAddress]:
        """Every device of ``device``'s IOMMU group (itself included), in address order;
        [] when it is in none or the host does not say."""
        raise NotImplementedError

    def is_bridge(self, device: PciDevice) -> bool:
        """A bridge or port, which vfio accepts in a group whatever its driver."""
        raise NotImplementedError

    def libvirt_devices(self) -> dict[str, PciDevice]:
        """libvirt's node devices by address, where they add to the facts above (a
        product name): local only; for a remote host they *are* the facts."""
        return {}

    def gpu_list_hint(self) -> str:
        return "`tdxvirt gpu list` shows the GPUs"

    # --- TDX, firmware, files -------------------------------------------------------
    def tdx_enabled(self) -> bool | None:
        raise NotImplementedError

    def tdx_problem(self) -> str | None:
        """Why a TD cannot start on the host for want of TDX; None when fine or unknown."""
        raise NotImplementedError

    def tdx_firmware(self, dialect: str) -> str | None:
        """The TDX firmware's path on the host, or None: libvirt picks it there."""
        raise NotImplementedError

    def firmware_exists(self, path: str) -> bool | None:
        raise NotImplementedError

    def disk_exists(self, path: str) -> bool | None:
        raise NotImplementedError

    def program_installed(self, name: str) -> bool | None:
        """Whether the host has a program libvirt runs for a TD (passt); None: unknown
        (libvirt does not say, as for a remote host)."""
        return None

    def bridge_exists(self, name: str) -> bool | None:
        """Whether the host has this network bridge; None: unknown (a remote host, or a
        host whose /sys is not its kernel's)."""
        return None

    def check_disk(self, spec: TDSpec) -> list[str]:
        """Check the --disk / --image the spec names; the warnings (InputError: refused)."""
        raise NotImplementedError

    def paths_from_config(self, config: Config) -> tuple[str | None, str | None, list[str]]:
        """(ovmf, qemu) from tdxvirt's config file for this host, and warnings."""
        raise NotImplementedError

    def recorded_builds(self) -> dict:
        """What `tdxvirt build` recorded for this host (tdxvirt.build.artifacts)."""
        raise NotImplementedError

    # --- GPU modes, storage -----------------------------------------------------
    def mode_reader(self, tool_path: str | None = None) -> Callable | None:
        """A reader of GPUs' CC / PPCIe modes (tdxvirt.gpu.modes.mode_reader), or None:
        the modes are unknown."""
        raise NotImplementedError

    def storage_removal(self, name: str, xml: str, recorded: dict, config=None) -> StorageRemoval:
        """The checked files ``undefine --remove-storage`` deletes (InputError: refused)."""
        raise NotImplementedError


def facts_for(conn, host: HostRoot | HostFacts | None = None, uri: str | None = None) -> HostFacts:
    """The facts of the host ``conn`` (its URI, or ``uri``) runs TDs on.

    ``host`` is the HostRoot this machine's facts are read below (used only for a
    local URI), or facts already chosen (returned as they are)."""
    if isinstance(host, HostFacts):
        return host
    uri = uri if uri is not None else conn.getURI()
    if is_remote(uri):
        if conn is None:
            from ..errors import LibvirtUnavailableError

            raise LibvirtUnavailableError(f"{uri} names another host, whose facts only its "
                                          "libvirt can tell, and libvirt is not reachable")
        from .libvirt import LibvirtFacts

        return LibvirtFacts(conn, uri)
    from ..host import HostRoot
    from .local import LocalFacts

    return LocalFacts(host if host is not None else HostRoot("/"), uri, conn)


__all__ = ["HostFacts", "facts_for", "host_of"]
