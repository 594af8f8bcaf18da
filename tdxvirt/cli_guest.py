"""``tdxvirt guest``: the TD's own kernel config, and read-only checks inside a running TD."""

from __future__ import annotations

import json

import click

from .cli import _td_names  # completion, imported only when completing


@click.group()
def guest():
    """The guest side of a TD: its kernel config and in-guest checks."""


@guest.command(name="check-config")
@click.argument("config_file", metavar="CONFIG_FILE")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def check_config(config_file, as_json):
    """Check a guest kernel config for a TD with an NVIDIA GPU.

    CONFIG_FILE is a /boot/config-* file, a kernel build's .config, or /proc/config.gz.
    Exit 1 when a required option is missing.
    """
    from .guest import GuestNotReadyError
    from .guest.checks import check_config as run_checks
    from .kconfig import load_kernel_config

    report = run_checks(load_kernel_config(config_file))
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        from .textsafe import safe, table

        # values read from the config file (a state such as CONFIG_X="...") are escaped
        rows = [[r.requirement.group, f"CONFIG_{r.requirement.symbol}", r.needs, r.has, r.result, r.note]
                for r in report.results]
        kernel = f" (Linux {safe(report.config.version)})" if report.config.version else ""
        click.echo(f"Guest kernel config {safe(config_file)}{kernel}")
        click.echo(table(rows, ["GROUP", "OPTION", "NEEDS", "HAS", "RESULT", "NOTE"]))
        if report.advised:
            names = ", ".join(f"CONFIG_{r.requirement.symbol}" for r in report.advised)
            click.echo(f"Advised, not required: {names}")
        if report.ok:
            click.echo("Every required option is set.")
    if not report.ok:
        raise GuestNotReadyError(report.failure_message())


@guest.command()
@click.argument("name", shell_complete=_td_names)
@click.option("--timeout", type=click.FloatRange(min=1), default=30, show_default=True,
              help="Seconds to wait for each command in the guest.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def verify(session, name, timeout, as_json):
    """Check TDX and the GPU inside a running TD (QEMU guest agent).

    Runs read-only commands in the guest through its agent. Exit 1 when a check fails.
    """
    from .guest import GuestNotReadyError
    from .guest.verify import verify_domain

    report = verify_domain(session.conn(), name, timeout=timeout)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        from .textsafe import quoted, safe, table

        # Every detail is the guest's own output (capped by verify, escaped here): a
        # guest decides what its agent answers, so none of it is shown raw, and none of
        # it is called verified: only attestation (a TD quote) proves what a TD runs.
        rows = [[c.name, c.result, c.detail] for c in report.checks]
        click.echo(table(rows, ["CHECK", "RESULT", "DETAIL"]))
        for check in report.failed:
            if check.fix:
                click.echo(f"fix ({check.name}): {safe(check.fix)}")
        click.echo(f"Results are what the guest in TD {quoted(report.domain)} reported through its "
                   "agent, not verified: only attestation (a TD quote) proves TDX.")
        if report.ok:
            click.echo("The guest reports TDX active and its GPU ready for confidential "
                       "computing (reported by the guest; attest the TD to verify it).")
    if not report.ok:
        raise GuestNotReadyError(report.failure_message())
