"""``tdxvirt gpu``: list NVIDIA devices, move them to vfio-pci and back, CC / PPCIe mode.

Wire into the main command with ``main.add_command(gpu)``. Only click is imported at
start-up; the library is imported by each command. ``make_group(Hooks(...))`` builds
the same group with the root check, the sysfs writer or the libvirt connection
replaced, which is how tests drive it without touching a real device.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

import click

from . import _gpu_addresses  # completion, imported only when completing


@dataclass(frozen=True)
class Hooks:
    """What tests replace: who we are, what writes sysfs, what libvirt is."""

    euid: Callable[[], int] = os.geteuid
    sysfs_writer: Callable | None = None  # HostRoot -> writer with .write(path, value)
    libvirt_conn: Callable | None = None  # Session -> libvirt connection


def _size(count: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:g} {unit}"
    return f"{count} B" if count else "-"


def _binder(session, method: str, hooks: Hooks):
    from ..gpu.binding import LibvirtBinder, SysfsBinder

    if method == "sysfs":
        writer = hooks.sysfs_writer(session.host) if hooks.sysfs_writer else None
        return SysfsBinder(session.host, writer)
    return LibvirtBinder((lambda: hooks.libvirt_conn(session)) if hooks.libvirt_conn
                         else session.conn)


# Every table cell and message value read from sysfs, libvirt (domain names) or NVIDIA's
# tool goes through tdxvirt.textsafe: none of them may drive the terminal.


def _print_outcomes(outcomes) -> None:
    from ..textsafe import table

    rows = [[o.address, o.label, o.before or "-", o.after or "-", o.result] for o in outcomes]
    click.echo(table(rows, ["DEVICE", "WHAT", "BEFORE", "NOW", "RESULT"]))


def _print_modes(results, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in results], indent=2))
        return
    from ..textsafe import table

    rows = [[r.address, r.model, r.cc_mode or "-", r.ppcie_mode or "-", r.result] for r in results]
    click.echo(table(rows, ["DEVICE", "MODEL", "CC", "PPCIE", "RESULT"]))


def _group_cell(record) -> str:
    if record.iommu_group is None:
        return "none"
    others = [f"{p.address} {'bridge' if p.bridge else p.driver or 'no driver'}"
              for p in record.peers]
    return record.iommu_group + (f" (+ {', '.join(others)})" if others else "")


def _this_machine_only(session, what: str) -> None:
    """detach, reattach and cc-mode read and change this machine's sysfs and run NVIDIA's
    tool here: refused for a URI naming another host, before anything is read."""
    from ..errors import InputError
    from ..virt.conn import is_remote

    if is_remote(session.uri):
        raise InputError(f"{what} reads and changes the GPUs of the machine it runs on, and "
                         f"{session.uri} names another host; run it on that host")


def make_group(hooks: Hooks | None = None) -> click.Group:
    hooks = hooks or Hooks()

    @click.group(name="gpu")
    def gpu():
        """NVIDIA GPUs: list, move to vfio-pci and back, CC / PPCIe mode."""

    @gpu.command(name="list")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.option("--modes", is_flag=True,
                  help="Also read CC / PPCIe modes with NVIDIA's tool (needs root).")
    @click.option("--tool", metavar="PATH",
                  help="nvidia_gpu_tools to use: nvtrust checkout, script or executable.")
    @click.pass_obj
    def list_(session, as_json, modes, tool):
        """Every NVIDIA GPU and NVSwitch: model, driver, IOMMU group, NUMA, BARs, TD."""
        if session.several:
            _list_fleet(session, as_json, modes, tool)
            return
        records, where, warnings = _gpu_records(session, modes, tool)
        for warning in warnings:
            click.echo(f"tdxvirt: warning: {warning}", err=True)
        if as_json:
            click.echo(json.dumps([r.to_json() for r in records], indent=2))
            return
        if not records:
            click.echo(f"No NVIDIA GPU or NVSwitch on {where}")
            return
        _print_gpus(records)

    def _refuse_remote_modes(uri: str) -> None:
        from ..errors import InputError
        from ..virt.conn import is_remote

        if is_remote(uri):
            raise InputError(f"--modes runs NVIDIA's tool on this machine, but {uri} "
                             "names another host: read CC / PPCIe modes there (`tdxvirt gpu "
                             "list --modes` on that host)")

    def _gpu_records(session, modes, tool):
        """(records, where they are, warnings: escaped) of the session's one host."""
        from ..errors import LibvirtUnavailableError
        from ..gpu import discovery
        from ..textsafe import safe
        from ..virt.conn import is_remote

        remote = is_remote(session.uri)
        if modes:
            _refuse_remote_modes(session.uri)
        warnings = []
        try:
            conn = (hooks.libvirt_conn(session) if hooks.libvirt_conn else session.conn())
        except LibvirtUnavailableError as error:
            if remote:  # another host's GPUs are known only to its libvirt
                raise
            warnings.append(f"no libvirt facts or TDs: {safe(str(error))}")  # libvirt's words
            conn = None
        facts = session.facts(conn) if conn is not None else None
        records = discovery.discover(facts if facts is not None else session.host, conn)
        if modes and records:
            from ..gpu import admin_tool, ccmode, devices, privilege

            privilege.require_root("reading CC / PPCIe modes", privilege.READS_REGISTERS,
                                   hooks.euid, dry_run_hint=False)
            found = devices.read_targets(session.host, [r.address for r in records])
            results = ccmode.query(admin_tool.locate(tool, session.host), found,
                                   ccmode.has_nvswitches(session.host))
            warnings += [f"{safe(r.address)}: {safe(r.result)}" for r in results if not r.ok]
            records = discovery.with_modes(
                records, {r.address: (r.cc_mode, r.ppcie_mode) for r in results})
        return records, (facts.where if facts is not None else "this host"), warnings

    def _print_gpus(records, hosts: list[str] | None = None) -> None:
        from ..textsafe import table

        # TD is a domain name from libvirt, which accepts CR, ESC and bidi marks in it
        rows = [[r.address, r.model, r.driver or "-", _group_cell(r),
                 "-" if r.numa_node is None else r.numa_node,
                 "unknown" if r.largest_bar is None else _size(r.largest_bar),
                 r.cc_mode or "-", r.ppcie_mode or "-", r.td or "-"] for r in records]
        headers = ["DEVICE", "MODEL", "DRIVER", "IOMMU GROUP", "NUMA", "LARGEST BAR", "CC",
                   "PPCIE", "TD"]
        if hosts is not None:  # a fleet: each device's host first
            rows = [[host, *row] for host, row in zip(hosts, rows)]
            headers.insert(0, "HOST")
        click.echo(table(rows, headers))

    def _list_fleet(session, as_json, modes, tool):
        """`gpu list` on several hosts at once (tdxvirt.lifecycle.fleet), a HOST column first."""
        from ..errors import InputError
        from ..textsafe import safe
        from . import _ask_fleet, _fleet_failed, fleet_error_records

        if modes:  # refused before any host is asked, not once per host
            for host in session.hosts:
                _refuse_remote_modes(host.uri)
            if len(session.hosts) > 1:  # every one is this machine: the same GPUs
                raise InputError(
                    f"--modes runs NVIDIA's tool on this machine's GPUs, and the "
                    f"{len(session.hosts)} URIs given all name this machine, so it would run "
                    "on the same GPUs at once; give one -c with --modes")
        answers = _ask_fleet(session, lambda each: _gpu_records(each, modes, tool))
        records, hosts = [], []  # each record and the host it is on
        for answer in answers:
            found, _, warnings = answer.value or ((), None, ())
            for warning in warnings:
                click.echo(f"tdxvirt: warning: host {safe(answer.host.label)}: {warning}", err=True)
            records += found
            hosts += [answer.host] * len(found)
        if as_json:
            click.echo(json.dumps([{"host": host.label, "uri": host.uri, **r.to_json()}
                                   for host, r in zip(hosts, records)]
                                  + fleet_error_records(answers), indent=2))
        elif records:
            _print_gpus(records, [host.label for host in hosts])
        else:
            click.echo(f"No NVIDIA GPU or NVSwitch on the "
                       f"{sum(a.error is None for a in answers)} host(s) that answered")
        _fleet_failed(answers)

    def _refuse_under_running_domains(session, targets, what: str, groups: bool) -> None:
        from ..lifecycle.gpuops import refuse_under_running_domains

        note = refuse_under_running_domains(
            lambda: hooks.libvirt_conn(session) if hooks.libvirt_conn else session.conn(),
            session.host, targets, what, groups)
        if note:
            click.echo(f"tdxvirt: note: {note}", err=True)

    def _move(session, bdfs, method, dry_run, action, force=False, reset=False):
        from ..gpu import devices, privilege, vfio

        _this_machine_only(session, f"tdxvirt gpu {action}")
        if not dry_run:
            privilege.require_root(f"tdxvirt gpu {action}", privilege.CHANGES_DRIVERS, hooks.euid)
        host = session.host
        targets = devices.read_targets(host, bdfs)
        if reset or action == vfio.REATTACH:
            _refuse_under_running_domains(session, targets, "a reset" if reset else "a reattach",
                                          groups=True)
        binder = _binder(session, method, hooks)
        if dry_run:
            if reset:
                lines = vfio.dry_run_reset(host, targets, binder, force)
            elif action == vfio.DETACH:
                lines = vfio.dry_run(vfio.plan_detach(host, targets, force), binder)
            else:
                lines = vfio.dry_run(vfio.plan_reattach(host, targets), binder)
            from ..textsafe import safe

            click.echo("\n".join(safe(line) for line in lines))
            return
        try:
            if reset:
                outcomes = vfio.reset(host, targets, binder, force)
            elif action == vfio.DETACH:
                outcomes = vfio.apply(vfio.plan_detach(host, targets, force), binder, host)
            else:
                outcomes = vfio.apply(vfio.plan_reattach(host, targets), binder, host)
        except vfio.BindingError as error:
            _print_outcomes(error.outcomes)
            raise
        _print_outcomes(outcomes)

    method_option = click.option(
        "--method", type=click.Choice(["libvirt", "sysfs"]), default="libvirt",
        show_default=True,
        help="libvirt: virNodeDeviceDetachFlags / ReAttach; sysfs: driver_override + unbind/probe.")
    dry_run_option = click.option("--dry-run", is_flag=True,
                                  help="Print every write / libvirt call; change nothing.")

    @gpu.command()
    @click.argument("bdfs", nargs=-1, required=True, metavar="BDF...", shell_complete=_gpu_addresses)
    @method_option
    @dry_run_option
    @click.option("--force", is_flag=True, help="Detach even if processes use the GPU.")
    @click.option("--reset", is_flag=True,
                  help="Re-attach then detach (clears stale vfio/iommufd state).")
    @click.pass_obj
    def detach(session, bdfs, method, dry_run, force, reset):
        """Bind GPUs, and every endpoint of their IOMMU groups, to vfio-pci (all or nothing)."""
        _move(session, bdfs, method, dry_run, "detach", force=force, reset=reset)

    @gpu.command()
    @click.argument("bdfs", nargs=-1, required=True, metavar="BDF...", shell_complete=_gpu_addresses)
    @method_option
    @dry_run_option
    @click.pass_obj
    def reattach(session, bdfs, method, dry_run):
        """Give GPUs (and their IOMMU groups) back to their host drivers (all or nothing)."""
        _move(session, bdfs, method, dry_run, "reattach")

    @gpu.command(name="cc-mode")
    @click.argument("bdfs", nargs=-1, required=True, metavar="BDF...", shell_complete=_gpu_addresses)
    @click.option("--set", "cc", type=click.Choice(["on", "off", "devtools"]),
                  help="Set CC mode (the GPU is reset after the switch).")
    @click.option("--ppcie", type=click.Choice(["on", "off"]),
                  help="Set PPCIe mode on the whole HGX board (all GPUs and NVSwitches).")
    @click.option("--tool", metavar="PATH",
                  help="nvidia_gpu_tools to use: nvtrust checkout, script or executable.")
    @click.option("--dry-run", is_flag=True,
                  help="Print the commands --set / --ppcie would run; change nothing.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.pass_obj
    def cc_mode(session, bdfs, cc, ppcie, tool, dry_run, as_json):
        """Query (default) or set CC / PPCIe mode with NVIDIA's gpu-admin-tools, by BDF."""
        from ..gpu import admin_tool, ccmode, privilege
        from ..lifecycle.gpuops import check_mode_request, mode_dry_run_lines, mode_targets

        _this_machine_only(session, "tdxvirt gpu cc-mode")
        check_mode_request(cc, ppcie)
        setting = cc or ppcie
        if setting and not dry_run:
            privilege.require_root("tdxvirt gpu cc-mode --set/--ppcie", privilege.CHANGES_MODE,
                                   hooks.euid)
        elif not setting:
            privilege.require_root("tdxvirt gpu cc-mode", privilege.READS_REGISTERS,
                                   hooks.euid, dry_run_hint=False)
        host = session.host
        targets, extra = mode_targets(host, bdfs, cc, ppcie)
        if extra:
            from ..textsafe import safe

            click.echo(f"PPCIe is board-wide: also setting {safe(', '.join(extra))}", err=True)
        if setting:  # the switch resets the GPU
            _refuse_under_running_domains(session, targets, "a mode switch (with its reset)",
                                          groups=False)
        tool_cmd = admin_tool.locate(tool, host)
        if not setting:
            results = ccmode.query(tool_cmd, targets, ccmode.has_nvswitches(host))
            _print_modes(results, as_json)
            failed = [r for r in results if not r.ok]
            if failed:
                raise ccmode.ModeError(f"cannot read the mode of {failed[0].address}: "
                                       f"{failed[0].result.removeprefix('FAILED: ')}", results)
            return
        if dry_run:
            for line in mode_dry_run_lines(host, tool_cmd, targets, setting, bool(ppcie)):
                click.echo(line)
            return
        try:
            if ppcie:
                results = ccmode.set_ppcie(host, tool_cmd, targets, ppcie)
            else:
                results = ccmode.set_cc(host, tool_cmd, targets, cc)
        except ccmode.ModeError as error:
            _print_modes(error.results, as_json)
            raise
        _print_modes(results, as_json)
        if cc and (mixed := ccmode.mixed_board(host, tool_cmd, targets, cc)):
            from ..textsafe import safe
            from .remedies import targeted

            click.echo(f"tdxvirt: warning: {safe(targeted(mixed))}", err=True)

    return gpu


gpu = make_group()
