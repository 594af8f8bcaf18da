"""Moving one PCI device between its host driver and vfio-pci, two ways.

Both binders turn a device's current state into a list of *steps* (sysfs writes or
libvirt calls); ``--dry-run`` prints those steps and ``run`` performs exactly them,
so what is shown is what is done. Neither decides anything about groups or order:
``tdxvirt.gpu.vfio`` does, and re-reads sysfs afterwards to check the end state.

- ``LibvirtBinder``: virNodeDeviceDetachFlags(driver "vfio") / virNodeDeviceReAttach,
  what ``virsh nodedev-detach`` / ``nodedev-reattach`` do.
- ``SysfsBinder``: ``driver_override`` + unbind + ``drivers_probe``, the kernel's
  per-device way (the ``new_id`` way binds every device with that id, so it is not used).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from ..errors import HostNotReadyError
from ..host import HostRoot
from ..host.pci import PCI_DEVICES
from ..pci import PciAddress
from .groups import VFIO_DRIVER

DRIVERS = "/sys/bus/pci/drivers"
DRIVERS_PROBE = "/sys/bus/pci/drivers_probe"
# libvirt's name for the vfio backend in virNodeDeviceDetachFlags (binds vfio-pci).
LIBVIRT_VFIO_BACKEND = "vfio"


@dataclass(frozen=True)
class DeviceState:
    """What the kernel says about a device's binding right now."""

    address: PciAddress
    driver: str | None
    driver_override: str | None  # None when the kernel shows "(null)"


def read_state(root: HostRoot, address: PciAddress) -> DeviceState:
    base = f"{PCI_DEVICES}/{address}"
    override = root.read_value(f"{base}/driver_override")
    return DeviceState(
        address=address,
        driver=root.link_name(f"{base}/driver"),
        driver_override=None if override in (None, "", "(null)") else override,
    )


class StepFailed(Exception):
    """A step the host refused; ``busy`` when it said the device is in use."""

    def __init__(self, message: str, busy: bool = False):
        super().__init__(message)
        self.busy = busy


class Step(Protocol):
    def describe(self) -> str: ...


class Binder(Protocol):
    method: str

    def check_ready(self, to_vfio: bool) -> None: ...
    def steps_to_vfio(self, state: DeviceState, restore: DeviceState | None = None) -> list: ...
    def steps_to_host(self, state: DeviceState, restore: DeviceState | None = None) -> list: ...
    def run(self, steps: Sequence) -> None: ...


# ---------------------------------------------------------------- sysfs


@dataclass(frozen=True)
class SysfsWrite:
    path: str  # absolute host path of the attribute
    value: str
    note: str = ""
    shown_path: str = ""  # the file actually written (below the host root)

    def describe(self) -> str:
        note = f"  ({self.note})" if self.note else ""
        return f"write {self.value.strip() or '(newline)'!r} to {self.shown_path or self.path}{note}"


class SysfsWriter:
    """Writes one sysfs attribute below a HostRoot; the kernel reacts to the write.

    The attribute must exist (no O_CREAT): a missing one means the kernel does not
    offer that operation, and creating a file instead would hide it.
    """

    def __init__(self, root: HostRoot):
        self.root = root

    def write(self, absolute: str, value: str) -> None:
        fd = os.open(self.root.path(absolute), os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)


class SysfsBinder:
    method = "sysfs"

    def __init__(self, root: HostRoot, writer: SysfsWriter | None = None):
        self.root = root
        self.writer = writer or SysfsWriter(root)

    def check_ready(self, to_vfio: bool) -> None:
        if to_vfio and not self.root.exists(f"{DRIVERS}/{VFIO_DRIVER}"):
            raise HostNotReadyError(
                "the vfio-pci driver is not loaded (no /sys/bus/pci/drivers/vfio-pci); "
                "run `modprobe vfio-pci` first, or use --method libvirt (libvirt loads it)"
            )

    def _write(self, path: str, value: str, note: str = "") -> SysfsWrite:
        return SysfsWrite(path, value, note, str(self.root.path(path)))

    def _unbind(self, state: DeviceState) -> list[SysfsWrite]:
        if state.driver is None:
            return []
        return [self._write(f"{PCI_DEVICES}/{state.address}/driver/unbind", str(state.address),
                            f"unbinds {state.driver}")]

    def steps_to_vfio(self, state: DeviceState, restore: DeviceState | None = None) -> list[SysfsWrite]:
        """To vfio-pci; on a rollback (``restore``) the override it had is put back
        after the bind (an override only matters at the next probe)."""
        steps = [
            self._write(f"{PCI_DEVICES}/{state.address}/driver_override", VFIO_DRIVER),
            *self._unbind(state),
            self._write(DRIVERS_PROBE, str(state.address), f"binds {VFIO_DRIVER}"),
        ]
        if restore is not None and restore.driver_override != VFIO_DRIVER:
            steps.append(self._write(f"{PCI_DEVICES}/{state.address}/driver_override",
                                     restore.driver_override or "\n", "as it was"))
        return steps

    def steps_to_host(self, state: DeviceState, restore: DeviceState | None = None) -> list[SysfsWrite]:
        """Back to the host: to ``restore``'s driver and override when given (a
        rollback), else whichever driver the kernel picks."""
        override = restore.driver_override if restore else None
        steps = [
            self._write(f"{PCI_DEVICES}/{state.address}/driver_override", override or "\n",
                        "" if override else "clears it"),
            *self._unbind(state),
        ]
        if restore is None:
            steps.append(self._write(DRIVERS_PROBE, str(state.address), "the kernel picks the driver"))
        elif restore.driver is not None:
            steps.append(self._write(f"{DRIVERS}/{restore.driver}/bind", str(state.address)))
        return steps

    def run(self, steps: Sequence[SysfsWrite]) -> None:
        for step in steps:
            try:
                self.writer.write(step.path, step.value)
            except OSError as error:
                raise StepFailed(
                    f"writing {step.value.strip() or 'a newline'!r} to {step.path} failed: "
                    f"{error.strerror or error}",
                    busy=error.errno == errno.EBUSY,
                ) from None


# ---------------------------------------------------------------- libvirt


def nodedev_name(address: PciAddress) -> str:
    """libvirt's node device name for a PCI address (``virsh nodedev-list``)."""
    return f"pci_{address.domain:04x}_{address.bus:02x}_{address.slot:02x}_{address.function:x}"


@dataclass(frozen=True)
class LibvirtCall:
    """One libvirt-python call: on the connection, or on the node device looked up."""

    target: str  # "virConnect" or "virNodeDevice"
    method: str  # the libvirt-python method name
    args: tuple
    c_api: str  # the C API it maps to, for people reading --dry-run

    def describe(self) -> str:
        args = ", ".join(repr(arg) for arg in self.args)
        return f"{self.target}.{self.method}({args})  # {self.c_api}"


def _lookup(address: PciAddress) -> LibvirtCall:
    return LibvirtCall("virConnect", "nodeDeviceLookupByName", (nodedev_name(address),),
                       "virNodeDeviceLookupByName")


class LibvirtBinder:
    method = "libvirt"

    def __init__(self, open_conn: Callable[[], object]):
        self._open_conn = open_conn  # opened at check_ready, so --dry-run needs no libvirt
        self._conn = None

    def check_ready(self, to_vfio: bool) -> None:
        if self._conn is None:
            self._conn = self._open_conn()

    def steps_to_vfio(self, state: DeviceState, restore: DeviceState | None = None) -> list[LibvirtCall]:
        return [_lookup(state.address),
                LibvirtCall("virNodeDevice", "detachFlags", (LIBVIRT_VFIO_BACKEND, 0),
                            "virNodeDeviceDetachFlags")]

    def steps_to_host(self, state: DeviceState, restore: DeviceState | None = None) -> list[LibvirtCall]:
        # libvirt re-probes the device, so the kernel picks its driver even on rollback.
        return [_lookup(state.address),
                LibvirtCall("virNodeDevice", "reAttach", (), "virNodeDeviceReAttach")]

    def run(self, steps: Sequence[LibvirtCall]) -> None:
        from ..virt.conn import libvirt_error_type, message

        self.check_ready(to_vfio=False)
        device = None
        for step in steps:
            target = self._conn if step.target == "virConnect" else device
            try:
                result = getattr(target, step.method)(*step.args)
            except libvirt_error_type() as error:
                text = message(error)
                raise StepFailed(f"libvirt {step.c_api} failed: {text}",
                                 busy="in use" in text or "busy" in text.lower()) from None
            if step.target == "virConnect":
                device = result
