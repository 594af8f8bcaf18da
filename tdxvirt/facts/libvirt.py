"""Another host's facts (the URI names it), all through its libvirt connection.

- PCI devices: node devices (``virsh nodedev-dumpxml pci_dddd_bb_ss_f``): vendor and
  product ids, class, driver, IOMMU group and its members, NUMA node. libvirt does not
  report BAR sizes: they come from tdxvirt's table of known GPUs
  (tdxvirt.host.nvidia.KNOWN_BAR_SIZES), else they are unknown and ``define`` asks
  for ``--mmio-window``. libvirt names no driver for an unbound device (and its test
  driver drops every driver), so ``driver`` None is "unbound or not reported".
- TDX: the domain capabilities (``<tdx supported='yes'/>``); libvirt's test driver
  describes no real host, so there it is unknown.
- Firmware: never a path of this machine. For the native dialect tdxvirt names none:
  ``<os firmware='efi'>`` has libvirt pick, on that host, the firmware whose QEMU
  descriptor has the feature ``intel-tdx`` (libvirt >= 11.6 matches TDX launch security
  to it, at define time, as a ``<loader type='rom'>``). Other dialects need ``--ovmf``.
  A loader libvirt lists in the domain capabilities exists; any other is unknown.
- Disks: storage volumes (``storageVolLookupByPath``); a path in no pool is unknown.
- CC mode: unknown (NVIDIA's tool runs on the GPU's own host, never here).
- Storage: nothing is deleted on another host.
"""

from __future__ import annotations

import shlex
from functools import cached_property

from lxml import etree

from ..errors import InputError, LibvirtUnavailableError, NotFoundError
from ..host import nvidia
from ..host.pci import PciDevice
from ..pci import PciAddress
from ..virt.conn import host_of, libvirt_error_type, translate
from . import HostFacts

# virConnectListAllNodeDeviceFlags VIR_CONNECT_LIST_NODE_DEVICES_CAP_PCI_DEV
CAP_PCI_DEV = 2
# PCI-to-PCI, CardBus and semi-transparent bridges (host.iommu's class fallback): libvirt
# reports no header type.
_BRIDGE_CLASSES = {0x0604, 0x0607, 0x0609}


def nodedev_name(address: PciAddress | str) -> str:
    """libvirt's node device name of a PCI address: ``pci_0000_38_00_0``."""
    return "pci_" + str(address).replace(":", "_").replace(".", "_")


def _int(value: str | None) -> int:
    return int(value or "0", 0)


def parse_nodedev_xml(xml: str) -> PciDevice | None:
    """The device record of a PCI node device's XML; None for any other kind of device."""
    root = etree.fromstring(xml.encode())
    cap = root.find("capability[@type='pci']")
    if cap is None:
        return None
    address = PciAddress(*(_int(cap.findtext(tag)) for tag in ("domain", "bus", "slot", "function")))
    group = cap.find("iommuGroup")
    numa = cap.find("numa")
    numa_node = int(numa.get("node")) if numa is not None and numa.get("node") else None
    vendor = _int(cap.find("vendor").get("id")) if cap.find("vendor") is not None else 0
    device = _int(cap.find("product").get("id")) if cap.find("product") is not None else 0
    return PciDevice(
        address=address,
        vendor=vendor,
        device=device,
        pci_class=_int(cap.findtext("class")),
        numa_node=None if numa_node is None or numa_node < 0 else numa_node,
        driver=root.findtext("driver/name") or None,
        iommu_group=group.get("number") if group is not None else None,
        bar_sizes=nvidia.known_bar_sizes(vendor, device),  # libvirt reports no BARs
        product=(cap.findtext("product") or "").strip() or None,
        group_addresses=tuple(
            PciAddress(*(_int(a.get(k)) for k in ("domain", "bus", "slot", "function")))
            for a in (group.iterfind("address") if group is not None else ())
        ),
    )


def pci_node_devices(conn) -> dict[str, PciDevice]:
    """Every PCI node device libvirt knows, by full address (0000:38:00.0)."""
    found = {}
    for device in conn.listAllDevices(CAP_PCI_DEV):
        parsed = parse_nodedev_xml(device.XMLDesc(0))
        if parsed is not None:
            found[str(parsed.address)] = parsed
    return found


def _hostname(uri: str) -> str | None:
    from urllib.parse import urlparse

    try:
        return urlparse(uri).hostname
    except ValueError:
        return None


def _code(error) -> int | None:
    return error.get_error_code() if hasattr(error, "get_error_code") else None


class LibvirtFacts(HostFacts):
    remote = True

    def __init__(self, conn, uri: str):
        self.conn = conn
        self.uri = uri
        self.lock_host = host_of(uri)
        self.host_name = _hostname(uri) or self.lock_host  # as the URI names it, for messages
        self.where = f"host {self.host_name}"
        self._devices: dict[str, PciDevice] | None = None

    def __repr__(self) -> str:
        return f"LibvirtFacts({self.uri!r})"

    def _failed(self, error, what: str):
        return translate(error, f"{what} (libvirt at {self.uri})")

    # --- PCI devices --------------------------------------------------------------
    def all_devices(self) -> dict[str, PciDevice]:
        """Every PCI node device of the host (one listing, kept)."""
        if self._devices is None:
            try:
                self._devices = pci_node_devices(self.conn)
            except libvirt_error_type() as error:
                raise self._failed(error, "cannot list the host's PCI devices") from None
        return self._devices

    def _lookup(self, address: PciAddress) -> PciDevice | None:
        if self._devices is not None:
            return self._devices.get(str(address))
        import libvirt

        name = nodedev_name(address)
        try:
            xml = self.conn.nodeDeviceLookupByName(name).XMLDesc(0)
        except libvirt.libvirtError as error:
            if _code(error) == libvirt.VIR_ERR_NO_NODE_DEVICE:
                return None
            raise self._failed(error, f"cannot read node device {name}") from None
        return parse_nodedev_xml(xml)

    def device(self, address: PciAddress) -> PciDevice:
        found = self._lookup(address)
        if found is None:
            raise NotFoundError(
                f"no PCI device {address} on {self.where}: libvirt at {self.uri} has no node "
                f"device {nodedev_name(address)}; {self.gpu_list_hint()}")
        return found

    def nvidia_devices(self) -> list[PciDevice]:
        return sorted((d for d in self.all_devices().values() if nvidia.is_passthrough_candidate(d)),
                      key=lambda d: d.address)

    def group_members(self, device: PciDevice) -> list[PciAddress]:
        return sorted(device.group_addresses)

    def is_bridge(self, device: PciDevice) -> bool:
        return (device.pci_class >> 8) in _BRIDGE_CLASSES

    def gpu_list_hint(self) -> str:
        return f"`tdxvirt -c {shlex.quote(self.uri)} gpu list` shows the GPUs there"

    # --- TDX, firmware, files -------------------------------------------------------
    @cached_property
    def _domcaps(self):
        """The domain capabilities of a q35 KVM guest there, or None (unknown)."""
        try:
            if self.conn.getType().upper() == "TEST":
                return None  # the test driver's describe no real host
            xml = self.conn.getDomainCapabilities(None, "x86_64", "q35", "kvm", 0)
        except libvirt_error_type() as error:
            failure = self._failed(error, "cannot read the domain capabilities")
            if isinstance(failure, LibvirtUnavailableError):
                raise failure from None
            return None
        return etree.fromstring(xml.encode())

    def tdx_enabled(self) -> bool | None:
        if self._domcaps is None:
            return None
        from ..virt.dialect import domcaps_report_tdx

        return domcaps_report_tdx(etree.tostring(self._domcaps, encoding="unicode"))

    def tdx_problem(self) -> str | None:
        if self.tdx_enabled() is False:
            return (f"libvirt at {self.uri} reports no TDX support in its domain capabilities "
                    "(TDX off in the BIOS, kvm_intel without tdx=on, or a QEMU without "
                    f"tdx-guest); run `tdxvirt host check` on {self.host_name}")
        return None

    def loaders(self) -> list[str]:
        """The firmware files libvirt lists for that host (its QEMU firmware descriptors)."""
        if self._domcaps is None:
            return []
        return [v.strip() for v in self._domcaps.xpath("os/loader/value/text()")]

    def tdx_firmware(self, dialect: str) -> str | None:
        if dialect in ("native", "plain"):
            return None  # <os firmware='efi'>: libvirt picks the intel-tdx descriptor there
        raise InputError(
            f"the {dialect} dialect needs the TDX firmware named, and tdxvirt names no file of "
            f"this machine for {self.where}: pass --ovmf PATH, its path on {self.host_name} "
            f"(`virsh -c {shlex.quote(self.uri)} domcapabilities` lists the firmware libvirt knows there)")

    def firmware_exists(self, path: str) -> bool | None:
        return True if path in self.loaders() else None

    def _volume(self, path: str):
        """The storage volume libvirt has for ``path`` there, or None (in no pool)."""
        try:
            return self.conn.storageVolLookupByPath(path)
        except libvirt_error_type() as error:
            failure = self._failed(error, f"cannot look up {path}")
            if isinstance(failure, LibvirtUnavailableError):
                raise failure from None
            return None  # no such volume, no storage driver: unknown

    def disk_exists(self, path: str) -> bool | None:
        return True if self._volume(path) is not None else None

    def check_disk(self, spec) -> list[str]:
        """--disk as libvirt's storage volumes know it there. --image creates a file on
        this machine and is refused by define for a remote URI."""
        if not spec.disk:
            return []
        volume = self._volume(spec.disk)
        if volume is None:
            return [f"--disk {spec.disk}: libvirt at {self.uri} has it in no storage pool, so "
                    f"whether it exists on {self.host_name} is unknown (the start fails if not)"]
        try:
            root = etree.fromstring(volume.XMLDesc(0).encode())
        except libvirt_error_type() as error:
            raise self._failed(error, f"cannot read the volume {spec.disk}") from None
        backing = (root.findtext("backingStore/path") or "").strip()
        if backing and not spec.allow_backing_file:
            raise InputError(
                f"--disk {spec.disk}: libvirt on {self.host_name} reports a backing file "
                f"({backing!r}), which the TD would read too; refusing: flatten it there "
                "(`qemu-img convert`), or pass --allow-backing-file if you trust its whole chain")
        seen = root.find("target/format")
        seen = seen.get("type") if seen is not None else None
        if seen in ("raw", "qcow2") and seen != spec.disk_format:
            return [f"--disk {spec.disk}: libvirt on {self.host_name} sees a {seen} image, used as "
                    f"{spec.disk_format} (the declared format; never guessed); if it is {seen}, "
                    f"pass --disk-format {seen}"]
        return []

    def paths_from_config(self, config) -> tuple[str | None, str | None, list[str]]:
        """tdxvirt's config file names paths of this machine: not used for another host."""
        ignored = [key for key in ("ovmf", "qemu") if getattr(config, key)]
        warnings = [f"defaults.{key} of the config file names a file of this machine; not used "
                    f"for {self.where} (pass --{key} with its path there)" for key in ignored]
        return None, None, warnings

    def recorded_builds(self) -> dict:
        return {}  # `tdxvirt build` records this machine's builds

    # --- GPU modes, storage -----------------------------------------------------
    def mode_reader(self, tool_path: str | None = None):
        if tool_path:
            raise InputError(f"--gpu-tool runs NVIDIA's tool on this machine, but {self.uri} "
                             f"names {self.host_name}: CC modes are read on that host "
                             "(`tdxvirt gpu cc-mode` there)")
        return None  # CC / PPCIe modes: unknown from here

    def storage_removal(self, name: str, xml: str, recorded: dict, config=None):
        from ..domain.storage_paths import StorageRemoval

        return StorageRemoval(name, xml, self.uri, recorded, config)  # refuses every file
