"""`tdxvirt selftest`: prove a host end to end (tdxvirt.lifecycle.selftest)."""

from __future__ import annotations

import json
import sys

import click

from . import pass_session


@click.command()
@click.option("--gpu", metavar="BDF", help="The GPU to pass through (default: the first one no "
                                           "running domain holds).")
@click.option("--no-gpu", is_flag=True, help="A TD without a GPU.")
@click.option("--image", metavar="PATH", help="A guest image with qemu-guest-agent to boot (on the "
                                              "simulated host: its own guest, built for the run).")
@click.option("--image-format", type=click.Choice(["qcow2", "raw"]), default="qcow2", show_default=True)
@click.option("--boot-timeout", type=click.FloatRange(min=1), default=300, show_default=True,
              metavar="S", help="Seconds the guest has to boot and answer through its agent.")
@click.option("--reconnect-timeout", type=click.FloatRange(min=0), default=60, show_default=True,
              metavar="S", help="Seconds the clean-up waits for a libvirtd that stopped answering "
                                "mid-run (crashed, restarted) before it gives up, naming the TD left.")
@click.option("--collateral", metavar="FILE", type=click.Path(dir_okay=False),
              help="Quote verification collateral for the attestation step.")
@click.option("--pccs-url", metavar="URL", help="A PCCS for the attestation step's collateral.")
@click.option("--keep", is_flag=True, help="Leave the throw-away TD defined (and stopped).")
@click.option("--report", "report_file", metavar="FILE", type=click.Path(dir_okay=False),
              help="Write the report (markdown) a bug report can carry: host facts, every step, "
                   "the domain XML, QEMU's last log lines.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_session
def selftest(session, gpu, no_gpu, image, image_format, boot_timeout, reconnect_timeout, collateral,
             pccs_url, keep, report_file, as_json):
    """Prove this host runs GPU TDs: host check, then a throw-away TD defined, started,
    reached through its guest agent, verified, attested, rebooted, stopped, undefined.

    Each step passes, fails with its remedy, or is skipped saying why (on the simulated
    host, what needs real TDX or the GPU in the guest). Exit 0 when no step failed.
    """
    from ..errors import InputError
    from ..lifecycle.selftest import PASS, SKIP, Options, SelfTest, leftover_remedy, markdown
    from ..sim.onehost import SimHostRoot

    if gpu and no_gpu:
        raise InputError("--gpu and --no-gpu: give one of them")
    if gpu:
        from ..pci import PciAddress

        gpu = str(PciAddress.parse(gpu))  # a typo is a usage error, before anything runs
    if image:
        from ..domain.spec import validate_existing_file

        image = validate_existing_file(image, "--image")
    conn = session.conn()
    facts = session.facts(conn)
    emulated = not facts.remote and isinstance(facts.host, SimHostRoot)
    options = Options(gpu=gpu, no_gpu=no_gpu, image=image, image_format=image_format,
                      boot_timeout=boot_timeout, reconnect_timeout=reconnect_timeout, keep=keep,
                      collateral=collateral, pccs_url=pccs_url, emulated=emulated)
    marks = {PASS: "pass", SKIP: "skip"}
    show = sys.stderr.isatty() if as_json else True

    def progress(step):
        if show:
            from ..textsafe import safe

            mark = marks.get(step.status, "FAIL")
            click.echo(f"{mark:<5} {step.name} ({step.seconds:.1f} s): {safe(step.detail)}",
                       err=as_json)
            if step.status not in marks and step.remedy:
                click.echo(f"      fix: {safe(step.remedy)}", err=as_json)

    report = SelfTest(conn, facts, options, progress).run()
    if report_file:
        with open(report_file, "w") as out:
            out.write(markdown(report))
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    elif report.ok:
        click.echo("This host runs GPU TDs" + (" (emulated: TDX-only steps skipped)" if emulated else ""))
    if not report.ok:
        first = report.first_failure
        left = f"; {leftover_remedy(report.left_behind)}" if report.left_behind else ""
        raise click.ClickException(f"selftest failed at {first.name}: {first.detail}"
                                   + (f"; {first.remedy}" if first.remedy else "") + left)
