"""`tdxvirt repair`: bring an edited TD back to what tdxvirt defined (tdxvirt.lifecycle.repair)."""

from __future__ import annotations

import click

from . import _td_names, pass_session


@click.command()
@click.argument("name", shell_complete=_td_names)
@click.option("--mmio-window", metavar="SIZE",
              help="64-bit MMIO window to put back, e.g. 256G (default: sized from the hostdevs' "
                   "BARs, else the one define recorded).")
@click.option("--dry-run", is_flag=True, help="Show the changes as a diff; change nothing.")
@pass_session
def repair(session, name, mmio_window, dry_run):
    """Undo edits that weakened a TD, keeping compatible ones (vCPUs, memory, disks).

    Fixes exactly what `tdxvirt show NAME` lists as problems: launch security, firmware,
    NVRAM, irqchip, SMM, PMU, shared memory, huge pages, the MMIO window, iommufd, a
    managed-save image. Prints the changes as a diff of the definition. A running TD
    gets the repaired definition at its next start.
    """
    from ..lifecycle.repair import repair_td
    from ..textsafe import quoted, terminal_lines
    from ..units import parse_size

    window = None if mmio_window is None else parse_size(mmio_window, "--mmio-window")
    conn = session.conn()
    result = repair_td(conn, session.facts(conn), name, dry_run=dry_run, window_override=window)
    if not result.is_td:
        click.echo(f"{quoted(result.name)} is not a TD (no TDX launch security, and tdxvirt did "
                   "not define it as one): nothing to repair")
        return
    if not result.needed:
        click.echo(f"{quoted(result.name)} is the TD tdxvirt defined: nothing to repair")
        return
    if result.changes:
        # the domain's own text (names, paths other tools wrote) is made terminal-safe
        click.echo(terminal_lines(result.diff()))
    changes = list(result.changes)
    if result.remove_managed_save:
        changes.append("remove the managed-save image (a TD is booted and measured afresh, never "
                       "resumed from saved memory)")
    click.echo("Would change:" if dry_run else "Changed:")
    for change in changes:
        click.echo(f"  - {terminal_lines(change)}")
    if dry_run:
        click.echo("(dry run: nothing was changed)")
        return
    click.echo(f"Repaired {quoted(result.name)}" + (
        "; it is running: the repair takes effect when it is next started"
        if result.running else ""))


@click.command()
@click.argument("name", shell_complete=_td_names)
@click.option("--dry-run", is_flag=True, help="Show what would be recorded; record nothing.")
@pass_session
def adopt(session, name, dry_run):
    """Record a TD tdxvirt has no record of (another tool's, a clone) as it is now.

    From then on `show`, `repair`, `start` and libvirt's hook judge it against this
    root-owned record, whatever is later edited in its XML. A TD that breaks TDX's
    rules is refused: `tdxvirt repair NAME` first.
    """
    from ..lifecycle.adopt import adopt_td
    from ..textsafe import quoted, terminal_lines

    conn = session.conn()
    result = adopt_td(conn, name, dry_run=dry_run, host=session.facts(conn))
    record = result.record
    policy = "-" if record.policy is None else f"{record.policy:#x}"

    def boot_file(field: str, unset: str) -> str:
        path = getattr(record, field)
        found = record.digests.get(field)
        if not path or found is None:
            return path or unset
        changed = ", not the file recorded before" if field in result.redigested else ""
        return f"{path} (sha256 {found['sha256'][:16]}, {found['size']} bytes{changed})"

    rows = [("dialect", record.dialect), ("TD attributes", policy),
            ("MRCONFIGID", record.mr_config_id or "-"), ("MROWNER", record.mr_owner or "-"),
            ("MROWNERCONFIG", record.mr_owner_config or "-"),
            ("firmware", boot_file("loader", "libvirt's choice at each start")),
            ("kernel", boot_file("kernel", "-")), ("initrd", boot_file("initrd", "-")),
            ("GPUs", ", ".join(record.gpus) or "-"),
            ("QEMU arguments", " ".join(record.qemu_args) or "-"), ("CPU mode", record.cpu_mode)]
    click.echo(("Would record" if dry_run else "Recorded") + f" {quoted(result.name)} "
               f"({record.uuid})" + (", replacing its previous record" if result.replaces else "") + ":")
    for label, value in rows:
        click.echo(f"  {label + ':':16} {terminal_lines(value)}")
    if dry_run:
        click.echo("(dry run: nothing was recorded)")
