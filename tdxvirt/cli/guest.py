"""``tdxvirt guest``: the TD's own kernel config, and read-only checks inside a running TD."""

from __future__ import annotations

import json

import click

from . import _td_names  # completion, imported only when completing


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
    from ..guest import GuestNotReadyError
    from ..guest.checks import check_config as run_checks
    from ..kconfig import load_kernel_config

    report = run_checks(load_kernel_config(config_file))
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        from ..textsafe import safe, table

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
@click.option("--wait", type=click.FloatRange(min=0), default=0, metavar="S",
              help="Seconds to wait for a booting guest's agent to connect (default: none, "
                   "an agent not connected yet fails at once).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def verify(session, name, timeout, wait, as_json):
    """Check TDX and the GPU inside a running TD (QEMU guest agent).

    Runs read-only commands in the guest through its agent. Exit 1 when a check fails.
    """
    from ..guest import GuestNotReadyError
    from ..guest.verify import verify_domain

    report = verify_domain(session.conn(), name, timeout=timeout, wait=wait)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        from ..textsafe import quoted, safe, table

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


def _nonce(ctx, param, value):
    """--nonce HEX: 1 to 64 bytes; default 64 fresh random bytes."""
    if value is None:
        import secrets

        return secrets.token_bytes(64)
    try:
        nonce = bytes.fromhex(value)
    except ValueError:
        raise click.BadParameter("give the nonce as hex digits (an even number of 0-9, a-f)") from None
    if not 1 <= len(nonce) <= 64:
        raise click.BadParameter(f"a nonce is 1 to 64 bytes; this one is {len(nonce)}")
    return nonce


def _url(ctx, param, value):
    if value is not None and not value.startswith(("https://", "http://")):
        raise click.BadParameter("give the PCCS as an http(s):// URL, e.g. https://pccs.example:8081")
    return value


@guest.command()
@click.argument("name", shell_complete=_td_names)
@click.option("--nonce", metavar="HEX", callback=_nonce,
              help="REPORTDATA for the quote: 1 to 64 bytes in hex, zero-padded to 64 "
                   "(default: 64 fresh random bytes).")
@click.option("--collateral", metavar="FILE", type=click.Path(dir_okay=False),
              help="Verify the quote's signature offline with this collateral (dcap-qvl's JSON).")
@click.option("--pccs-url", metavar="URL", callback=_url,
              help="Fetch the collateral from this PCCS (default: pccs_url in the config file).")
@click.option("--firmware", metavar="FILE", type=click.Path(dir_okay=False),
              help="The TD's firmware image as a file here, for the MRTD prediction (remote hosts).")
@click.option("--page-order", type=click.Choice(["single-pass", "two-pass"]), default="single-pass",
              show_default=True,
              help="How the host adds firmware pages, for the MRTD prediction (as `measure`).")
@click.option("--timeout", type=click.FloatRange(min=1), default=60, show_default=True,
              help="Seconds to wait for each command in the guest.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def attest(session, name, nonce, collateral, pccs_url, firmware, page_order, timeout, as_json):
    """Attest a running TD: fetch a TD quote in the guest, verify it here.

    Through the QEMU guest agent the guest's kernel makes a quote (configfs-tsm) whose
    REPORTDATA is the nonce; the CC event log and, where NVIDIA's tools are installed
    in the guest, the GPU's CC mode and NVIDIA's verifier result are collected too; the
    event log is replayed against the quote's RTMRs (--json lists its events).
    Here the quote is parsed, REPORTDATA compared with the nonce, the debug bit checked,
    MRTD and the RTMRs compared with their predictions, and the signature chain
    verified with a DCAP verifier (dcap-qvl) and collateral from --collateral or a PCCS.
    Each check says pass, fail or not-checked. Exit 0 only when none failed and the
    quote's signature verified; else 1.
    """
    from ..attest import AttestationFailedError
    from ..attest.report import CollateralSource, attest_domain, predictor

    # Inputs are read before the guest is asked anything: a bad file changes nothing.
    source = CollateralSource.chosen(collateral, pccs_url)
    conn = session.conn()
    facts = session.facts(conn)
    report = attest_domain(conn, name, nonce, predictor(conn, facts, page_order, firmware), source,
                           timeout)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        _print_attestation(report)
    if not report.ok:
        raise AttestationFailedError(report.failure_message())


def _print_attestation(report) -> None:
    from ..textsafe import quoted, safe, table

    rows = [[c.name, c.result, c.detail] for c in report.checks]
    click.echo(table(rows, ["CHECK", "RESULT", "DETAIL"]))
    collateral = report.collateral
    if collateral is not None:
        valid = collateral.as_dict()
        click.echo(f"Collateral: {safe(collateral.source)}, valid {valid['valid_from']} to "
                   f"{valid['valid_until']}; verified as of {report.as_dict()['verification_time']}.")
    click.echo(f"Nonce (REPORTDATA): {report.nonce.hex()}")
    click.echo(f"The GPU rows are what the guest in TD {quoted(report.domain)} reported; the quote "
               "rows are checked here.")
    if not report.verified:
        click.echo("The quote's signature was not verified: its values are what the guest returned, "
                   "not proven to come from the TDX module.")
    if report.not_checked:
        click.echo("Not checked: " + ", ".join(c.name for c in report.not_checked) + " (see DETAIL).")
    for note in report.evidence.notes:
        click.echo(f"Note: {safe(note)}")
    if report.ok and not report.not_checked:
        click.echo(f"Every check passed for TD {quoted(report.domain)}.")
