"""GPU operations that need libvirt's view of the host as well as the GPUs': which
devices a CC / PPCIe mode change takes, what its dry run says, and the refusal of a
change that would pull a GPU from under a running domain. `tdxvirt gpu` and the
Ansible module tdx_gpu call these."""

from __future__ import annotations

import shlex
from collections.abc import Callable

from ..errors import DeviceBusyError, InputError, TdxvirtError
from ..textsafe import safe


def refuse_under_running_domains(connect: Callable, host, targets, what: str,
                                 groups: bool) -> str | None:
    """A reset, reattach or mode switch of a GPU libvirt runs a domain with pulls it
    from under that TD: refused from libvirt's answer (a QEMU holding its vfio files
    is refused too, further down). ``groups``: the IOMMU groups' endpoints move too.
    ``connect()`` opens libvirt; when it cannot, the note to show is returned (only
    processes holding the GPUs' files are then checked)."""
    from ..gpu.groups import read_group
    from .assemble import all_gpu_holders

    try:
        held = all_gpu_holders(connect(), running_only=True)
    except TdxvirtError as error:  # no libvirt here: no domain of its runs either
        return (f"libvirt could not say which domains run ({safe(str(error))}); only "
                "processes holding the GPUs' files are checked")
    addresses = []
    for device in targets:
        addresses.append(str(device.address))
        if groups and device.iommu_group is not None:
            try:
                addresses += [str(m.address) for m in read_group(host, device).endpoints]
            except TdxvirtError:
                pass  # read again, and refused with its reason, by the move itself
    for address in dict.fromkeys(addresses):
        if address in held:
            names = held[address]
            raise DeviceBusyError(
                f"{address} is passed through to running domain {safe(repr(names[0]))}"
                + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")
                + f"; {what} would pull it from under that TD: stop it first "
                f"(`tdxvirt stop {safe(shlex.quote(names[0]))}`)")
    return None


def check_mode_request(cc: str | None, ppcie: str | None) -> None:
    if cc and ppcie:
        raise InputError("--set (CC mode) and --ppcie are exclusive: PPCIe mode runs "
                         "with CC off; choose one")


def mode_targets(host, bdfs, cc: str | None, ppcie: str | None):
    """(the devices a CC / PPCIe mode change or query acts on, the addresses PPCIe adds
    because it is board-wide)."""
    from ..gpu import ccmode, devices

    check_mode_request(cc, ppcie)
    targets = devices.read_targets(host, bdfs)
    extra: list[str] = []
    if ppcie:
        ccmode.refuse_ppcie_on_blackwell(targets, ppcie)
        board = ccmode.ppcie_targets(host, targets)
        extra = [str(d.address) for d in board if d not in targets]
        targets = board
    elif cc:
        ccmode.cc_targets(targets)
        ccmode.require_fabric(host, targets, cc)  # refused before libvirt or the tool is asked
    return targets, extra


def mode_dry_run_lines(host, tool, targets, setting: str, ppcie: bool) -> list[str]:
    """What `gpu cc-mode --set/--ppcie --dry-run` prints, after the checks a set makes
    before it runs anything (the same refusals)."""
    from ..gpu import ccmode

    ccmode.require_vfio_first(targets)
    ccmode.require_idle(host, targets)
    fabric = None if ppcie else ccmode.require_fabric(host, targets, setting)
    if fabric is not None:
        return _mpt_dry_run_lines(tool, targets, setting, *fabric)
    return ["cc-mode (dry run, nothing changed): devices already in that mode are "
            "skipped; after the last run every device is queried again to check the mode"] + \
        ["  " + safe(shlex.join(argv)) for argv in ccmode.set_commands(tool, targets, setting, ppcie)]


def _mpt_dry_run_lines(tool, targets, setting: str, board, processes) -> list[str]:
    """Blackwell multi-GPU passthrough on an NVLink board: NVIDIA's whole order, each
    step with the tool runs it makes."""
    from ..gpu import ccmode

    def commands(argvs) -> list[str]:
        return ["  " + safe(shlex.join(argv)) for argv in argvs]

    named = {device.address for device in targets}
    others = [device for device in board.gpus if device.address not in named]
    # the names are tdxvirt's own (a process is found by its exact name)
    services = " and ".join(f"{process.name} (pid {process.pid})" for process in processes)
    lines = ["cc-mode (dry run, nothing changed): Blackwell multi-GPU passthrough on an HGX "
             "board, in NVIDIA's order",
             f"checked: {len(targets)} GPU(s) on vfio-pci and held by no VM; Fabric Manager "
             f"and NVLSM running: {services}",
             f"read each GPU's CC mode (a GPU already {setting} is skipped):",
             *commands(ccmode.query_commands(tool, targets)),
             f"set CC {setting} on each, with its reset (the reset NVLink 5 GPUs need after "
             "Fabric Manager starts):",
             *commands(ccmode.set_commands(tool, targets, setting, False)),
             f"after the last set, read every GPU again and check it is {setting}:",
             *commands(ccmode.query_commands(tool, targets))]
    if others:
        lines += [f"read the board's {len(others)} other Blackwell GPU(s) (a warning if one is "
                  f"not {setting}: a board mixing CC modes fails attestation):",
                  *commands(ccmode.query_commands(tool, others))]
    return lines
