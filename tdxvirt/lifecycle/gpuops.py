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
    return targets, extra


def mode_dry_run_lines(host, tool, targets, setting: str, ppcie: bool) -> list[str]:
    """What `gpu cc-mode --set/--ppcie --dry-run` prints, after the checks a set makes
    before it runs anything."""
    from ..gpu import ccmode

    ccmode.require_vfio_first(targets)
    ccmode.require_idle(host, targets)
    return ["cc-mode (dry run, nothing changed): devices already in that mode are "
            "skipped; each run is followed by a query to check the mode"] + \
        ["  " + safe(shlex.join(argv)) for argv in ccmode.set_commands(tool, targets, setting, ppcie)]
