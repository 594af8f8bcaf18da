"""Confidential-computing (CC) and protected-PCIe (PPCIe) mode, through NVIDIA's tool.

Rules tdxvirt adds around ``nvidia_gpu_tools``:
- NVIDIA's order: a device is bound to vfio-pci first, then its mode is set; a
  device on another driver is refused with the command that fixes it.
- a device a running VM holds through vfio is never switched (the switch resets it).
- PPCIe is a board-wide mode: every Hopper GPU and NVSwitch of the HGX board is set
  together, in one run of the tool, GPUs first then NVSwitches (as NVIDIA's
  ``--devices gpus,nvswitches`` orders them); the tool turns CC off for PPCIe and
  PPCIe off for CC itself.
- a device already in the wanted mode is left alone (no needless reset).
- CC is set on every GPU first, one run each with its reset, and only then is every
  GPU read back: on an NVLink board one GPU's reset can take another out of its mode.
- Blackwell multi-GPU passthrough (MPT) on an HGX board whose NVLink switches the host
  manages (tdxvirt.host.fabric) follows NVIDIA's order: GPUs on vfio-pci, Fabric
  Manager and NVLSM running, CC on every GPU, all reset, all checked. CC on without
  the fabric services is refused before the tool runs.
- every run is parsed into one result per device; a failure is one line per device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from ..errors import DeviceBusyError, HostNotReadyError, InputError, TdxvirtError
from ..host import HostRoot
from ..host.fabric import FABRIC_SERVICES, NvlinkBoard, nvlink_board, running
from ..host.pci import PciDevice
from ..host.procs import Process
from . import admin_tool
from .admin_tool import CC, PPCIE, Tool
from .busy import vm_users
from .devices import GPU, NVSWITCH, is_hopper, kind_of, model, nvidia_devices
from .groups import VFIO_DRIVER

CC_MODES = ("on", "off", "devtools")
PPCIE_MODES = ("on", "off")
QUERY_TIMEOUT = 120.0
SET_TIMEOUT_PER_DEVICE = 180.0  # a mode switch waits for the GPU's firmware to boot again


@dataclass(frozen=True)
class ModeResult:
    address: str
    model: str
    kind: str
    cc_mode: str | None
    ppcie_mode: str | None
    result: str
    ok: bool


class ModeError(TdxvirtError):
    """The tool failed on at least one device; ``results`` has every device's."""

    def __init__(self, message: str, results: list[ModeResult]):
        super().__init__(message)
        self.results = results


def board(root: HostRoot) -> list[PciDevice]:
    """The HGX board: every Hopper GPU, then every NVSwitch (one board per host)."""
    devices = nvidia_devices(root)
    return ([d for d in devices if is_hopper(d)] + [d for d in devices if kind_of(d) == NVSWITCH])


def has_nvswitches(root: HostRoot) -> bool:
    return any(kind_of(device) == NVSWITCH for device in nvidia_devices(root))


def _result(device: PciDevice, result: str, ok: bool, cc=None, ppcie=None) -> ModeResult:
    return ModeResult(str(device.address), model(device), kind_of(device) or "?", cc, ppcie,
                      result, ok)


def _outcomes(run: admin_tool.ToolRun, bdfs: list[str],
              done: Callable[[admin_tool.DeviceReport], bool]) -> dict[str, str | None]:
    """Per device: None when the tool did what was asked, else why not (one line).

    The tool handles devices in the order given and stops at the first failure, so a
    failure it does not pin on a device belongs to the first one not done, and the
    devices after a failure were not reached.
    """
    report = admin_tool.parse(run.output)
    outcomes: dict[str, str | None] = {}
    stopped_at = None
    for bdf in bdfs:
        device = report.devices.get(bdf, admin_tool.DeviceReport(bdf))
        if stopped_at is not None:
            outcomes[bdf] = f"not reached: the tool stopped at {stopped_at}"
        elif device.errors:
            outcomes[bdf] = admin_tool.without_device_text(device.errors[-1])
            stopped_at = bdf if run.returncode != 0 else None
        elif done(device):
            outcomes[bdf] = None
        elif run.timed_out or run.returncode != 0:
            why = run.timed_out or (admin_tool.without_device_text(report.errors[-1])
                                    if report.errors else f"exit status {run.returncode}")
            outcomes[bdf] = f"the tool failed: {why}"
            stopped_at = bdf
        else:
            outcomes[bdf] = "the tool said nothing about it (is the device at that address?)"
    return outcomes


def query(tool: Tool, devices: list[PciDevice], with_ppcie: bool,
          timeout: float = QUERY_TIMEOUT) -> list[ModeResult]:
    """Each device's CC mode (GPUs) and PPCIe mode (NVSwitches; GPUs when
    ``with_ppcie``), one run of the tool per device so one failure hides no other;
    ``timeout`` bounds each run."""
    results = []
    for device in devices:
        want_cc = kind_of(device) == GPU
        want_ppcie = kind_of(device) == NVSWITCH or (with_ppcie and is_hopper(device))
        bdf = str(device.address)
        run = admin_tool.run(tool, admin_tool.query_args(bdf, want_cc, want_ppcie), timeout)
        expected = {CC} if want_cc else set()
        expected |= {PPCIE} if want_ppcie else set()
        problem = _outcomes(run, [bdf], lambda r: expected <= set(r.modes))[bdf]
        modes = admin_tool.parse(run.output).devices.get(bdf, admin_tool.DeviceReport(bdf)).modes
        results.append(_result(device, "queried" if problem is None else f"FAILED: {problem}",
                               problem is None, modes.get(CC), modes.get(PPCIE)))
    return results


# The CC modes a start accepts: a TD runs on a GPU in CC mode on or devtools (NVIDIA's
# debug variant of on), with PPCIe on when NVSwitches are passed too; a plain VM on one
# whose mode is off (or that has none).
TD_CC_MODES = ("on", "devtools")
PLAIN_CC_MODES = (None, "off")


def mode_problems(device_of, addresses, tdx: bool, read_modes) -> list[str]:
    """What the GPUs' modes say against a start (tdxvirt's preflight and libvirt's hook):
    ``device_of`` reads a device of the host that runs the domain, ``addresses`` are its
    PCI hostdevs, ``read_modes`` reads their modes. Devices whose mode could not be read
    are left to the start itself."""
    from ..errors import NotFoundError
    from ..pci import PciAddress

    devices = []
    for address in addresses:  # every PCI hostdev, NICs and other devices included
        try:
            device = device_of(PciAddress.parse(address))
        except NotFoundError:
            continue  # reported by the hostdev check
        if kind_of(device) is not None:  # NVIDIA's tool is run on GPUs and NVSwitches only
            devices.append(device)
    if not devices:
        return []
    ppcie = tdx and any(kind_of(d) == NVSWITCH for d in devices)
    problems = []
    for result in read_modes(devices):
        if not result.ok:
            continue
        if ppcie:
            if result.ppcie_mode != "on":
                problems.append(f"{result.address} is not in PPCIe mode (it is "
                                f"{result.ppcie_mode or 'unknown'}); `tdxvirt gpu cc-mode "
                                f"{result.address} --ppcie on` sets the whole board")
        elif tdx and result.cc_mode not in TD_CC_MODES:
            problems.append(f"GPU {result.address} has CC mode {result.cc_mode}; a TD needs it "
                            f"on: `tdxvirt gpu cc-mode {result.address} --set on`")
        elif not tdx and result.cc_mode not in PLAIN_CC_MODES:
            problems.append(f"GPU {result.address} has CC mode {result.cc_mode}; a VM without "
                            f"TDX needs it off: `tdxvirt gpu cc-mode {result.address} --set off`")
    return problems


def require_vfio_first(devices: list[PciDevice]) -> None:
    for device in devices:
        if device.driver != VFIO_DRIVER:
            raise HostNotReadyError(
                f"{device.address} is on {device.driver or 'no driver'}, not {VFIO_DRIVER}: "
                "NVIDIA's order is vfio-pci first, then the mode; run `tdxvirt gpu detach "
                f"{device.address}` first"
            )


def require_idle(root: HostRoot, devices: list[PciDevice]) -> None:
    for device in devices:
        users = vm_users(root, device)
        if users:
            raise DeviceBusyError(
                f"{device.address} is in use by a VM ({users[0]}); a mode switch resets "
                "the device: stop that TD first"
            )


def cc_targets(devices: list[PciDevice]) -> list[PciDevice]:
    for device in devices:
        if kind_of(device) != GPU:
            raise InputError(f"{device.address} is an NVSwitch, which has no CC mode; "
                             "NVSwitches take part in PPCIe mode (--ppcie on)")
    return devices


def refuse_ppcie_on_blackwell(devices: list[PciDevice], mode: str) -> None:
    """Before anything else about PPCIe: on Blackwell the answer is another mode, not
    another board (an HGX B200 has no NVSwitch PCI device either)."""
    from ..host.nvidia import BLACKWELL_GEN, generation

    if mode == "on" and (blackwell := [d for d in devices if generation(d) == BLACKWELL_GEN]):
        raise InputError(f"{blackwell[0].address} is a Blackwell GPU: PPCIe is Hopper's multi-GPU "
                         "mode; Blackwell's multi-GPU passthrough needs CC on every GPU instead "
                         "(`tdxvirt gpu cc-mode BDF... --set on`)")


def ppcie_targets(root: HostRoot, devices: list[PciDevice]) -> list[PciDevice]:
    """The whole board, refusing names that are not on it."""
    members = board(root)
    if not any(kind_of(d) == NVSWITCH for d in members):
        raise HostNotReadyError(
            "PPCIe mode is for HGX boards whose GPUs share NVSwitches, and this host "
            "has no NVSwitch; for a GPU of its own use CC mode (--set on)"
        )
    on_board = {device.address for device in members}
    for device in devices:
        if device.address not in on_board:
            raise InputError(f"{device.address} ({model(device)}) is not on the HGX board "
                             "(its Hopper GPUs and NVSwitches); PPCIe cannot include it")
    return members


def set_commands(tool: Tool, devices: list[PciDevice], mode: str, ppcie: bool) -> list[tuple[str, ...]]:
    """The tool runs a set would make (before skipping devices already in the mode)."""
    bdfs = [str(device.address) for device in devices]
    if ppcie:
        return [(*tool.argv, *admin_tool.set_ppcie_args(bdfs, mode))]
    return [(*tool.argv, *admin_tool.set_cc_args(bdf, mode)) for bdf in bdfs]


def _set_failed(results: list[ModeResult], what: str, mode: str) -> None:
    failed = [r for r in results if not r.ok]
    if failed:
        first = failed[0]
        raise ModeError(
            f"setting {what} mode {mode} failed on {len(failed)} of {len(results)} device(s); "
            f"{first.address}: {first.result}", results)


def _query_or_fail(tool: Tool, devices: list[PciDevice], with_ppcie: bool, what: str) -> list[ModeResult]:
    current = query(tool, devices, with_ppcie)
    failed = [r for r in current if not r.ok]
    if failed:
        raise ModeError(f"cannot read the current {what} mode of {failed[0].address} "
                        f"({failed[0].result}); nothing was changed", current)
    return current


def _verified(tool: Tool, device: PciDevice, before: ModeResult, what: str, mode: str,
              with_ppcie: bool) -> ModeResult:
    """Read the mode back after the tool's reset: the end state is checked, not assumed."""
    after = query(tool, [device], with_ppcie)[0]
    was = before.cc_mode if what == CC else before.ppcie_mode
    now = after.cc_mode if what == CC else after.ppcie_mode
    if not after.ok:
        return replace(after, result=f"FAILED: set {mode}, but reading it back failed "
                                     f"({after.result.removeprefix('FAILED: ')})", ok=False)
    if now != mode:
        return replace(after, result=f"FAILED: after the reset it reports {what} mode "
                                     f"{now}, not {mode}", ok=False)
    return replace(after, result=f"set {mode} (was {was}), device reset")


def _failed_text(problem: str) -> str:
    return problem if problem.startswith("not reached") else f"FAILED: {problem}"


def query_commands(tool: Tool, devices: list[PciDevice]) -> list[tuple[str, ...]]:
    """The tool runs reading these GPUs' CC mode, as query() makes them."""
    return [(*tool.argv, *admin_tool.query_args(str(device.address), True, False))
            for device in devices]


def require_fabric(root: HostRoot, devices: list[PciDevice],
                   mode: str) -> tuple[NvlinkBoard, list[Process]] | None:
    """CC on (or devtools) for Blackwell GPUs of an HGX board whose NVLink switches the
    host manages: refused unless Fabric Manager and NVLSM run, because NVLink 5 GPUs
    must be reset after Fabric Manager starts and the CC switch's reset is that reset.
    Returns the board and the services' processes (the dry run names them); None off
    such a board, or for CC off."""
    if mode not in TD_CC_MODES:
        return None
    board = nvlink_board(root, devices)
    if board is None:
        return None
    found = [(service, running(root, service)) for service in FABRIC_SERVICES]
    missing = [service.title for service, process in found if process is None]
    if missing:
        raise HostNotReadyError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not running, and "
            f"CC {mode} on Blackwell GPUs of an HGX board whose NVLink switches this host manages "
            f"({len(board.management)} ConnectX 15b3:1021 function(s)) needs the NVLink fabric "
            "up first: start nvidia-fabricmanager with the NVLink subnet manager (nvlsm) first, "
            "then set CC (its reset is the reset NVLink 5 GPUs need after Fabric Manager starts)")
    return board, [process for _, process in found if process is not None]


def _after(resets: list[str], address: str, was_set: bool) -> list[str]:
    """The GPUs reset after this one's switch (after none: every GPU reset, when it
    was already in the mode)."""
    return resets[resets.index(address) + 1:] if was_set else [a for a in resets if a != address]


def _read_back(tool: Tool, targets: list[PciDevice], results: list[ModeResult], mode: str,
               resets: list[str]) -> list[ModeResult]:
    """Every GPU not already failed is read again once the last switch is done: on an
    NVLink board a GPU's reset can take another GPU out of the mode it was just given,
    so each is checked only when all are done. ``resets`` are the GPUs switched, in order."""
    checked = [device for device, result in zip(targets, results) if result.ok]
    after = {str(device.address): now for device, now in zip(checked, query(tool, checked, False))}
    done = []
    for result in results:
        now = after.get(result.address)
        was_set = result.address in resets
        if now is None:
            done.append(result)
        elif not now.ok:
            done.append(replace(now, result=f"FAILED: {'set ' + mode if was_set else 'was ' + mode}"
                                            f", but reading it back failed "
                                            f"({now.result.removeprefix('FAILED: ')})", ok=False))
        elif now.cc_mode != mode:
            later = _after(resets, result.address, was_set)
            if not later:
                why = "after the reset"
            else:
                why = (f"{'set ' + mode if was_set else 'was ' + mode}, but after the reset of "
                       f"{later[0]}" + (f" and {len(later) - 1} more GPU(s)" if len(later) > 1 else ""))
            done.append(replace(now, result=f"FAILED: {why} it reports CC mode {now.cc_mode}, "
                                            f"not {mode}", ok=False))
        else:
            done.append(replace(now, result=result.result))
    return done


def set_cc(root: HostRoot, tool: Tool, devices: list[PciDevice], mode: str) -> list[ModeResult]:
    """CC mode ``mode`` on each GPU (reset after the switch), one run per GPU, then every
    GPU read back; a failure on one does not stop the others."""
    if mode not in CC_MODES:
        raise InputError(f"CC mode {mode!r} is not one of {', '.join(CC_MODES)}")
    targets = cc_targets(devices)
    require_vfio_first(targets)
    require_idle(root, targets)
    require_fabric(root, targets, mode)
    current = _query_or_fail(tool, targets, False, CC)
    results = []
    resets: list[str] = []  # the GPUs switched, in order (a failed switch may reset too)
    for device, now in zip(targets, current):
        if now.cc_mode == mode:
            results.append(replace(now, result=f"already {mode}"))
            continue
        bdf = str(device.address)
        run = admin_tool.run(tool, admin_tool.set_cc_args(bdf, mode), SET_TIMEOUT_PER_DEVICE)
        resets.append(bdf)
        problem = _outcomes(run, [bdf], lambda r: CC in r.reset)[bdf]
        if problem is None:
            results.append(replace(now, result=f"set {mode} (was {now.cc_mode}), device reset"))
        else:
            results.append(replace(now, result=_failed_text(problem), ok=False))
    if resets:
        results = _read_back(tool, targets, results, mode, resets)
    _set_failed(results, CC, mode)
    return results


def mixed_board(root: HostRoot, tool: Tool, targets: list[PciDevice], mode: str) -> str | None:
    """After CC ``mode`` (on or devtools) was set on some Blackwell GPUs of an NVLink
    board: a warning naming the board's other GPUs the tool reads in another mode, or
    None. MPT needs every GPU of the TD on, and a board mixing CC on with other modes
    fails attestation; it is not refused, since the others may be meant for later."""
    if mode not in TD_CC_MODES or (board := nvlink_board(root, targets)) is None:
        return None
    named = {device.address for device in targets}
    others = [device for device in board.gpus if device.address not in named]
    differing = [r for r in query(tool, others, False) if r.cc_mode != mode] if others else []
    if not differing:
        return None
    shown = ", ".join(f"{r.address} ({r.cc_mode or 'unknown'})" for r in differing[:3])
    if len(differing) > 3:
        shown += f" and {len(differing) - 3} more"
    return (f"{len(board.gpus) - len(differing)} of the board's {len(board.gpus)} Blackwell "
            f"GPUs are in CC mode {mode}, but not {shown}: multi-GPU passthrough needs "
            "every GPU of a TD in CC on, and a board mixing CC on with other modes fails "
            f"attestation; `tdxvirt gpu cc-mode {' '.join(r.address for r in differing)} "
            f"--set {mode}` sets the others")


def set_ppcie(root: HostRoot, tool: Tool, devices: list[PciDevice], mode: str) -> list[ModeResult]:
    """PPCIe mode ``mode`` on the whole board, in one run of the tool; it stops at the
    first failure, and so does this (the rest are reported as not reached)."""
    if mode not in PPCIE_MODES:
        raise InputError(f"PPCIe mode {mode!r} is not one of {', '.join(PPCIE_MODES)}")
    refuse_ppcie_on_blackwell(devices, mode)
    targets = ppcie_targets(root, devices)
    require_vfio_first(targets)
    require_idle(root, targets)
    current = _query_or_fail(tool, targets, True, PPCIE)
    todo = [d for d, now in zip(targets, current) if now.ppcie_mode != mode]
    outcomes: dict[str, str | None] = {}
    if todo:
        bdfs = [str(device.address) for device in todo]
        run = admin_tool.run(tool, admin_tool.set_ppcie_args(bdfs, mode),
                             SET_TIMEOUT_PER_DEVICE * len(bdfs))
        outcomes = _outcomes(run, bdfs, lambda r: PPCIE in r.reset)
    results = []
    for device, now in zip(targets, current):
        if now.address not in outcomes:
            results.append(replace(now, result=f"already {mode}"))
        elif outcomes[now.address] is None:
            results.append(_verified(tool, device, now, PPCIE, mode, True))
        else:
            results.append(replace(now, result=_failed_text(outcomes[now.address]), ok=False))
    _set_failed(results, PPCIE, mode)
    return results
