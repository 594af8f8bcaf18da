"""`tdxvirt measure`: what a TD's measurements must be (tdxvirt.domain.measure)."""

from __future__ import annotations

import json

import click

from . import _td_names, pass_session

SINGLE_PASS, TWO_PASS = "single-pass", "two-pass"  # tdxvirt.domain.tdvf's names; not imported for --help


@click.command()
@click.argument("name", shell_complete=_td_names)
@click.option("--firmware", metavar="FILE", type=click.Path(dir_okay=False),
              help="The TD's firmware image as a file here (for a remote host, a copy of its file).")
@click.option("--kernel", metavar="FILE", type=click.Path(exists=True, dir_okay=False),
              help="A copy here of the TD's <kernel> (for a remote host).")
@click.option("--initrd", metavar="FILE", type=click.Path(exists=True, dir_okay=False),
              help="A copy here of the TD's <initrd> (for a remote host).")
@click.option("--page-order", type=click.Choice([SINGLE_PASS, TWO_PASS]), default=SINGLE_PASS,
              show_default=True, help="How the host adds firmware pages (single-pass: upstream KVM).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--reference-values", type=click.Choice(["trustee"]), default=None,
              help="Print the predictions as reference values for a verifier: trustee, a "
                   "message for Trustee's RVPS (`rvps-tool register --path FILE`).")
@pass_session
def measure(session, name, firmware, kernel, initrd, page_order, as_json, reference_values):
    """Predict a TD's measurements: MRTD from its firmware; RTMR1 and RTMR2 from a directly
    booted kernel, initrd and command line; each value it cannot predict says why."""
    from ..domain.measure import predict
    from ..domain.recorded import prediction_basis
    from ..domain.recordfiles import check as check_files
    from ..lifecycle import tds
    from ..textsafe import safe

    conn = session.conn()
    domain = tds.lookup(conn, name)
    basis = prediction_basis(conn.getURI(), domain.UUIDString(), tds.parsable_xml(domain.XMLDesc(0)))
    facts = session.facts(conn)

    def local_file(path: str):
        # The firmware, kernel and initrd are host facts: below the host root, never read
        # for a remote URI, and only when root's record names them (no hash oracle of
        # root's files for whoever can edit the domain's XML).
        return None if facts.remote or not basis.trusted else str(facts.host.path(path))

    from ..errors import TdxvirtError
    from ..virt.conn import qemu_version

    # the recorded files against those at their paths: a changed one is why a prediction
    # differs from define's (only here, below the host root; a remote host's hook checks its own)
    files = () if facts.remote or basis.record is None else check_files(basis.record, facts.host.path)
    try:
        result = predict(basis.xml, local_file, page_order, firmware, kernel, initrd,
                         unread_why=None if facts.remote or basis.trusted else basis.source,
                         qemu_version=qemu_version(conn))
    except TdxvirtError as error:
        wrong = [state for state in files if state.wrong]
        if not wrong:
            raise
        raise type(error)(f"{error}; and since it was recorded, {wrong[0].what()}") from None
    if reference_values:
        from ..domain.refvalues import trustee_message, trustee_values
        from ..errors import InputError

        values, left_out = trustee_values(result)
        if not values:
            raise InputError(f"nothing about {safe(result.name)!r} is predicted, so there are no "
                             f"reference values ({left_out[0]})")
        for line in left_out:
            click.echo(f"tdxvirt: left out {safe(line)}", err=True)
        click.echo(json.dumps(trustee_message(values), indent=2))
        return
    if as_json:
        click.echo(json.dumps({**result.as_dict(), "reference": basis.source,
                               "reference_differences": list(basis.differences),
                               "recorded_files": [state.as_dict() for state in files]}, indent=2))
        return
    click.echo(f"TD:        {safe(result.name)}")
    click.echo(f"reference: {safe(basis.source)}")
    for difference in basis.differences:
        click.echo(f"           the live definition DIFFERS: {safe(difference)}")
    for state in files:
        if state.state != "same":
            click.echo(f"           the recorded {state.name} {safe(state.path)}: {safe(state.describe())}")
    click.echo(f"firmware:  {safe(result.firmware)}")
    click.echo(f"MRTD:      {result.mrtd or 'unknown: ' + (result.unknown or '')}")
    click.echo(f"           (page order {result.order}: {result.order_note})")
    if result.recorded and result.order == SINGLE_PASS:
        same = result.recorded == result.mrtd
        click.echo(f"           {'the value define recorded' if same else 'DIFFERS from the value define recorded'}"
                   + ("" if same else f" ({result.recorded}): the firmware changed since"))
    for register in ("rtmr0", "rtmr1", "rtmr2"):
        click.echo(f"{register.upper() + ':':<11}{safe(getattr(result, register))}")
        recorded = getattr(result, f"recorded_{register}", None)
        if recorded:
            same = recorded == getattr(result, register)
            click.echo(f"           {'the value define recorded' if same else 'DIFFERS from the value define recorded'}"
                       + ("" if same else f" ({safe(recorded)}): the kernel, initrd, command line, "
                          "firmware or devices changed since"))
    for event in result.rtmr_events:
        click.echo(f"  {event['register']} {event['type']:<33}{event['digest']}  "
                   f"{safe(event['what'])}")
    for assumption in result.rtmr_assumptions:
        click.echo(f"  assumes: {safe(assumption)}")
