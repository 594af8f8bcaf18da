"""Fake GPU hosts for the gpu tests: sysfs trees from the real H100's values, a kernel
that reacts to sysfs writes, and a recording stand-in for libvirt's node devices.

The trees start from ``tdxvirt.sim.hostroot.build_host_root`` (every H100 file is the
real GPU's); what a host needs beyond it (other devices' ids, driver directories with
their bind/unbind attributes, /proc entries) is written here, on purpose, on top.
Nothing here ever touches this machine's own devices: every path is below a tmp root.
"""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import click

from tdxvirt.gpu.binding import SysfsWriter
from tdxvirt.host import HostRoot
from tdxvirt.sim.boards import (  # noqa: F401 (the simulated host's boards, re-exported)
    HGX_B200_SWITCH_MANAGEMENT,
    HGX_GPUS,
    blackwell,
    connectx_switch_management,
    hgx_b200_devices,
)
from tdxvirt.sim.boards import resource as _resource
from tdxvirt.sim.hostroot import FakePciDevice, build_host_root
from tdxvirt.virt.conn import open_connection

STANDIN = Path(__file__).resolve().parents[1] / "tdxvirt" / "sim" / "standin_gpu_tools.py"
HOST_DRIVERS = ("nvidia", "vfio-pci", "snd_hda_intel", "ice", "pcieport", "nvidia-nvswitch", "mlx5_core")

# ---------------------------------------------------------------- devices


def h100(address: str, group: int | None = 42, driver: str | None = "nvidia",
         numa: int | None = None, device_id: str | None = None) -> FakePciDevice:
    """The real H100 SXM5's sysfs values; NUMA / id / driver only where a test says."""
    overrides = {}
    if numa is not None:
        overrides["numa_node"] = str(numa)
    if device_id is not None:
        overrides["device"] = device_id
    return FakePciDevice(address, overrides=overrides, driver=driver, iommu_group=group)


def nvswitch(address: str, group: int, numa: int = 0, driver: str | None = "nvidia-nvswitch") -> FakePciDevice:
    """An NVSwitch (gen3, 0x22a3): class 0x068000 and one 32 MiB BAR."""
    return FakePciDevice(address, driver=driver, iommu_group=group, overrides={
        "device": "0x22a3", "class": "0x068000", "numa_node": str(numa),
        "resource": _resource((0x0000_2000_0000_0000 + int(address[5:7], 16) * 0x200_0000, 32 << 20))})


def audio(address: str, group: int, driver: str | None = "snd_hda_intel") -> FakePciDevice:
    """A GPU's HD-audio function (NVIDIA, class 0x040300, one 16 KiB BAR)."""
    return FakePciDevice(address, driver=driver, iommu_group=group, overrides={
        "device": "0x228b", "class": "0x040300", "resource": _resource((0xFB080000, 0x4000))})


def nic(address: str, group: int, driver: str | None = "ice") -> FakePciDevice:
    """An Intel E810 NIC (8086:1593, class 0x020000)."""
    return FakePciDevice(address, driver=driver, iommu_group=group, overrides={
        "vendor": "0x8086", "device": "0x1593", "class": "0x020000", "numa_node": "0",
        "resource": _resource((0x2000_0000_0000, 32 << 20))})


def bridge(address: str, group: int) -> FakePciDevice:
    """A PCIe switch downstream port (class 0x060400) bound to pcieport."""
    return FakePciDevice(address, driver="pcieport", iommu_group=group, overrides={
        "vendor": "0x10b5", "device": "0xc010", "class": "0x060400", "resource": _resource()})


HGX_SWITCHES = ("0000:05:00.0", "0000:06:00.0", "0000:07:00.0", "0000:08:00.0")


def hgx_devices(driver: str = "vfio-pci") -> tuple[FakePciDevice, ...]:
    """Eight H100 SXM5 (four per NUMA node) and four NVSwitches, each in its own group."""
    gpus = tuple(h100(a, group=10 + i, driver=driver, numa=0 if i < 4 else 1)
                 for i, a in enumerate(HGX_GPUS))
    switches = tuple(nvswitch(a, group=30 + i, driver=driver) for i, a in enumerate(HGX_SWITCHES))
    return gpus + switches


# ---------------------------------------------------------------- the tree


def build(path: Path, devices: tuple[FakePciDevice, ...]) -> HostRoot:
    """A fake host root with these devices, driver directories with their bind /
    unbind attributes (vfio-pci loaded), drivers_probe, a bridge's config space and a
    NIC's network interface."""
    root = build_host_root(path, devices=devices)
    base = root.path("/")
    (base / "sys/bus/pci/drivers_probe").write_text("")
    for driver in HOST_DRIVERS:
        directory = base / "sys/bus/pci/drivers" / driver
        directory.mkdir(parents=True, exist_ok=True)
        for attribute in ("bind", "unbind", "new_id"):
            (directory / attribute).write_text("")
    for device in devices:
        sysfs = base / "sys/bus/pci/devices" / device.address
        if device.overrides.get("class") == "0x060400":
            config = bytearray(64)
            config[0x0E] = 0x01  # header type 1: PCI-to-PCI bridge
            (sysfs / "config").write_bytes(bytes(config))
        if device.overrides.get("class") == "0x020000" and device.driver:
            (sysfs / "net/ens1f0").mkdir(parents=True)
    return root


def add_process(root: HostRoot, pid: int, command: str, files: list[str]) -> None:
    """A process in the fake /proc holding ``files`` open."""
    proc = root.path(f"/proc/{pid}")
    (proc / "fd").mkdir(parents=True, exist_ok=True)
    (proc / "comm").write_text(command + "\n")
    for number, target in enumerate(files, start=3):
        os.symlink(target, proc / "fd" / str(number))


def add_nvidia_information(root: HostRoot, address: str, minor: int) -> None:
    """/proc/driver/nvidia/gpus/<bdf>/information as the nvidia driver writes it."""
    path = root.path(f"/proc/driver/nvidia/gpus/{address}/information")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   \t\t 155\nGPU UUID: \t GPU-00000000-0000-0000-0000-000000000000\n"
        f"Bus Location: \t {address}\nDevice Minor: \t {minor}\nGPU Excluded:\t No\n")


def add_vfio_cdev(root: HostRoot, address: str, name: str) -> None:
    root.path(f"/sys/bus/pci/devices/{address}/vfio-dev/{name}").mkdir(parents=True)


def driver_of(root: HostRoot, address: str) -> str | None:
    return root.link_name(f"/sys/bus/pci/devices/{address}/driver")


def override_of(root: HostRoot, address: str) -> str:
    return root.read_value(f"/sys/bus/pci/devices/{address}/driver_override")


# ---------------------------------------------------------------- the kernel


_DEVICE_ATTR = re.compile(r"/sys/bus/pci/devices/(?P<bdf>[^/]+)/(?P<attr>driver_override|driver/unbind)")
_DRIVER_ATTR = re.compile(r"/sys/bus/pci/drivers/(?P<driver>[^/]+)/(?P<attr>bind|unbind)")


class FakeKernel(SysfsWriter):
    """The production writer (the file really is written), plus what Linux's PCI
    core does on such a write: store driver_override, drop or create the ``driver``
    link. ``refuse`` makes a driver's probe of a device fail (probe failures are not
    reported to the writer, as in Linux); ``fail`` makes a write fail with an errno."""

    def __init__(self, root: HostRoot, refuse: set[tuple[str, str]] = frozenset(),
                 fail: dict[tuple[str, str], int] | None = None,
                 natural: dict[str, str] | None = None):
        super().__init__(root)
        base = root.path("/sys/bus/pci/devices")
        # The driver the kernel would pick for each device: the one it has at the start.
        self.natural = {bdf: root.link_name(f"/sys/bus/pci/devices/{bdf}/driver")
                        for bdf in os.listdir(base)}
        self.natural = {bdf: drv for bdf, drv in self.natural.items() if drv != "vfio-pci"}
        self.natural.update(natural or {})
        self.refuse = set(refuse)
        self.fail = dict(fail or {})
        self.writes: list[tuple[str, str]] = []

    def write(self, absolute: str, value: str) -> None:
        self.writes.append((absolute, value))
        code = self.fail.get((absolute, value.strip()))
        if code is not None:
            raise OSError(code, os.strerror(code))
        super().write(absolute, value)
        self._react(absolute, value.strip())

    def _link(self, bdf: str) -> Path:
        return self.root.path(f"/sys/bus/pci/devices/{bdf}/driver")

    def _bind(self, bdf: str, driver: str) -> bool:
        if (bdf, driver) in self.refuse or not self.root.exists(f"/sys/bus/pci/drivers/{driver}"):
            return False
        os.symlink(f"../../drivers/{driver}", self._link(bdf))
        return True

    def _react(self, absolute: str, value: str) -> None:
        if absolute == "/sys/bus/pci/drivers_probe":
            if not self._link(value).is_symlink():
                override = override_of(self.root, value)
                driver = override if override not in (None, "(null)") else self.natural.get(value)
                if driver:
                    self._bind(value, driver)
            return
        if (match := _DEVICE_ATTR.fullmatch(absolute)):
            bdf = match["bdf"]
            if match["attr"] == "driver_override":
                self.root.path(absolute).write_text((value or "(null)") + "\n")
            else:
                self._unbind(value, driver_of(self.root, bdf), bdf)
            return
        if (match := _DRIVER_ATTR.fullmatch(absolute)):
            if match["attr"] == "unbind":
                self._unbind(value, match["driver"], value)
            elif self._link(value).is_symlink():
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
            else:
                override = override_of(self.root, value)
                if override not in (None, "(null)", match["driver"]) or not self._bind(value, match["driver"]):
                    raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))

    def _unbind(self, bdf: str, driver: str | None, expected: str) -> None:
        if bdf != expected or driver is None or driver_of(self.root, bdf) != driver:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        self._link(bdf).unlink()


# ---------------------------------------------------------------- libvirt


def real_libvirt_error(name: str):
    """A genuine libvirtError (VIR_ERR_NO_NODE_DEVICE) from libvirt's own test driver."""
    import libvirt

    conn = open_connection("test:///default")
    try:
        conn.nodeDeviceLookupByName(name)
    except libvirt.libvirtError as error:
        return error
    finally:
        conn.close()
    raise AssertionError(f"test:///default has a node device {name}")


@dataclass
class RecordingConnect:
    """Stands in for virConnect where libvirt's test driver cannot help (it cannot
    detach). Records each call as (class, method, args, kwargs) with libvirt-python's
    names, and does to the fake kernel what libvirt's virPCIDeviceBindToStub /
    UnbindFromStub write to sysfs. ``unknown``: node device names libvirt does not know."""

    kernel: FakeKernel
    unknown: set[str] = field(default_factory=set)
    calls: list[tuple[str, str, tuple, dict]] = field(default_factory=list)

    def nodeDeviceLookupByName(self, name):  # noqa: N802 (libvirt's name)
        self.calls.append(("virConnect", "nodeDeviceLookupByName", (name,), {}))
        if name in self.unknown:
            raise real_libvirt_error(name)
        return RecordingNodeDevice(self, name)


@dataclass
class RecordingNodeDevice:
    conn: RecordingConnect
    nodedev: str

    @property
    def bdf(self) -> str:
        _, domain, bus, slot, function = self.nodedev.split("_")
        return f"{domain}:{bus}:{slot}.{function}"

    def detachFlags(self, driverName, flags=0):  # noqa: N802,N803
        self.conn.calls.append(("virNodeDevice", "detachFlags", (driverName, flags), {}))
        kernel = self.conn.kernel
        assert driverName == "vfio"
        kernel.write(f"/sys/bus/pci/devices/{self.bdf}/driver_override", "vfio-pci")
        if driver_of(kernel.root, self.bdf):
            kernel.write(f"/sys/bus/pci/devices/{self.bdf}/driver/unbind", self.bdf)
        kernel.write("/sys/bus/pci/drivers_probe", self.bdf)
        return 0

    def reAttach(self):  # noqa: N802
        self.conn.calls.append(("virNodeDevice", "reAttach", (), {}))
        kernel = self.conn.kernel
        kernel.write(f"/sys/bus/pci/devices/{self.bdf}/driver_override", "\n")
        if driver_of(kernel.root, self.bdf):
            kernel.write(f"/sys/bus/pci/devices/{self.bdf}/driver/unbind", self.bdf)
        kernel.write("/sys/bus/pci/drivers_probe", self.bdf)
        return 0


# ---------------------------------------------------------------- the stand-in tool


@dataclass
class StandinTool:
    """Files the stand-in nvidia_gpu_tools reads and writes, and its environment."""

    root: HostRoot
    dir: Path

    def __post_init__(self):
        self.state_file = self.dir / "state.json"
        self.record_file = self.dir / "argv.jsonl"
        self.record_file.write_text("")
        if not self.state_file.exists():
            self.state_file.write_text("{}")

    @property
    def env(self) -> dict[str, str]:
        return {"STANDIN_SYSFS": str(self.root.base), "STANDIN_STATE": str(self.state_file),
                "STANDIN_RECORD": str(self.record_file)}

    def set_state(self, **per_device: dict) -> None:
        self.state_file.write_text(json.dumps(per_device))

    def update(self, bdf: str, **values) -> None:
        state = json.loads(self.state_file.read_text())
        state.setdefault(bdf, {}).update(values)
        self.state_file.write_text(json.dumps(state))

    def state(self) -> dict:
        return json.loads(self.state_file.read_text())

    def runs(self) -> list[list[str]]:
        return [json.loads(line) for line in self.record_file.read_text().splitlines()]


# ---------------------------------------------------------------- the command line


def cli(group: click.Group) -> click.Group:
    """tdxvirt's own top-level command (its options and one-line errors) carrying
    ``group``, so tests run the gpu commands exactly as `tdxvirt gpu ...` runs them."""
    from tdxvirt.cli import TdxvirtGroup, main

    root = TdxvirtGroup(name="tdxvirt", params=main.params, callback=main.callback,
                        context_settings=main.context_settings)
    root.add_command(group)
    return root

