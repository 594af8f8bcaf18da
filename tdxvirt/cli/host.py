"""``tdxvirt host check`` and ``tdxvirt host setup``: the host preflight doctor and setup.

Wired into the main command by ``main.add_command(host)``. Only click is imported at
start-up; the doctor, the host editors and tabulate are imported by the commands.
"""

from __future__ import annotations

import json

import click


@click.group(name="host")
def host():
    """Check and set up this host for TDs with GPUs passed through."""


@host.command(name="check")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--for-gpu", "gpus", multiple=True, metavar="BDF",
              help="Check this GPU (repeat for more; default: every NVIDIA GPU).")
@click.pass_context
def check(ctx, as_json, gpus):
    """Check everything a TD with GPUs needs; exit 1 if anything fails."""
    from ..doctor import failed
    from ..pci import PciAddress

    session = ctx.obj
    addresses = tuple(PciAddress.parse(gpu) for gpu in gpus)
    if session.several:
        _check_fleet(ctx, session, addresses, as_json)
        return
    results = _run_checks(session, addresses, session.conn)
    if as_json:
        click.echo(json.dumps(_report(session, results), indent=2))
    else:
        _print_checks(results)
    if failed(results):
        ctx.exit(1)


def _run_checks(session, addresses, connect):
    from ..doctor import Context, run_checks
    from ..host.commands import host_runner

    root = session.host
    # Programs run only from /: below any other host root the checks that need one
    # (QEMU's -object help) are reported as skipped, whoever runs this.
    return run_checks(Context(root, uri=session.uri, connect=connect,
                              runner=host_runner(root), gpus=addresses))


def _report(session, results) -> dict:
    from ..doctor import failed

    return {"uri": session.uri, "host_root": str(session.host.base), "failed": failed(results),
            "checks": [c.as_dict() for c in results]}


def _print_checks(results, host: str | None = None) -> None:
    """The checks' table and counts; ``host``: a fleet's HOST cell on every row."""
    from tabulate import tabulate

    from ..textsafe import safe

    rows = [[c.name, c.status, c.found, c.remedy] for c in results]
    headers = ["CHECK", "STATUS", "FOUND", "REMEDY"]
    widths = [None, None, 60, 50]
    if host is not None:  # found: that host's libvirt's words
        rows = [[host, *(safe(cell) if isinstance(cell, str) else cell for cell in row)]
                for row in rows]
        headers, widths = ["HOST", *headers], [None, *widths]
    click.echo(tabulate(rows, headers=headers, maxcolwidths=widths))
    counts = {s: sum(c.status == s for c in results) for s in ("ok", "warn", "fail", "skip")}
    click.echo("\n" + (f"{host}: " if host is not None else "")
               + ", ".join(f"{n} {s}" for s, n in counts.items()))


def _check_fleet(ctx, session, addresses, as_json) -> None:
    """`host check` on several hosts at once (tdxvirt.lifecycle.fleet): one table per host, each
    row with its HOST first, in the order the hosts were given. A host whose libvirt
    cannot be reached is one error line (not a table of checks that could not run)."""
    from ..doctor import failed
    from ..doctor.check import FAIL
    from ..textsafe import safe
    from . import _ask_fleet, _fleet_failed, fleet_error_records

    def question(each):
        each.conn()  # unreachable: this host's one error line
        results = _run_checks(each, addresses, each.conn)
        return results, {"host": each.label, **_report(each, results)}

    answers = _ask_fleet(session, question)
    answered = [a for a in answers if a.error is None]
    if as_json:
        click.echo(json.dumps([a.value[1] for a in answered] + fleet_error_records(answers),
                              indent=2))
    else:
        for number, answer in enumerate(answered):
            click.echo("\n" * bool(number), nl=False)
            _print_checks(answer.value[0], safe(answer.host.label))
    for answer in answered:
        failing = sum(check.status == FAIL for check in answer.value[0])
        if failing:
            click.echo(f"tdxvirt: host {safe(answer.host.label)}: {failing} check(s) failed",
                       err=True)
    _fleet_failed(answers)
    if any(failed(a.value[0]) for a in answered):
        ctx.exit(1)


@host.command(name="setup")
@click.option("--dry-run", is_flag=True, help="Print every diff and command; change nothing.")
@click.option("--revert", is_flag=True, help="Restore what setup changed, from its backups.")
@click.option("--user", metavar="U", help="User QEMU runs as (default: as configured, "
              "else the distribution's, e.g. libvirt-qemu).")
@click.option("--group", metavar="G", help="Group QEMU runs as (default: likewise).")
@click.option("--security-driver", type=click.Choice(["none", "keep"]), default="none",
              show_default=True, help="none: turn sVirt off, as Intel's device-passthrough setup does; "
              "keep: leave it on and install udev rules for the VFIO devices.")
@click.option("--legacy-vfio", is_flag=True,
              help="Also raise vfio_iommu_type1's dma_entry_limit (libvirt < 12.1).")
@click.option("--run-below-root", is_flag=True,
              help="With a host root other than /: run that tree's own grubby, update-grub, "
              "systemctl and udevadm inside it (chroot) as root; the tree and each program "
              "must be root's and not group/other-writable. --dry-run never runs them.")
@click.pass_context
def setup(ctx, dry_run, revert, user, group, security_driver, legacy_vfio, run_below_root):
    """Configure this host for TDs with GPUs (modprobe.d, kernel args, qemu.conf)."""
    from ..errors import InputError
    from ..hostcfg import setup as host_setup
    from ..hostcfg.plan import render_step

    session = ctx.obj
    host_setup.require_local(session.uri)
    if revert and (user or group or legacy_vfio or security_driver != "none"):
        raise InputError("--revert takes no other setup options (it restores the backups)")
    host_setup.check_privileges(dry_run)
    root = session.host
    runner = host_setup.runner_for(root, dry_run, run_below_root)

    def show(step):
        click.echo(render_step(step), nl=False)

    if revert:
        plan = host_setup.revert(root, runner, show, dry_run=dry_run)
    else:
        options = host_setup.SetupOptions(user=user, group=group,
                                          security_driver=security_driver,
                                          legacy_vfio=legacy_vfio)
        plan = host_setup.setup(root, runner, options, show, dry_run=dry_run)
    if dry_run:
        for step in plan.steps:
            show(step)
    if not plan.changes:
        click.echo("Nothing to change: " + ("no backups to restore" if revert else
                                            "the host is already set up as asked"))
    elif dry_run:
        click.echo("(dry run: nothing was changed)")
    cannot = [n for n in plan.notices if n.kind == "cannot"]
    if cannot:
        click.echo(f"tdxvirt: {len(cannot)} step(s) could not be done (see 'cannot:' above)",
                   err=True)
        ctx.exit(1)
