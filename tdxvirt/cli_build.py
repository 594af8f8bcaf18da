"""``tdxvirt build plan|run|status``: the TDX kernel, QEMU and OVMF from a manifest.

Only click is imported here at start-up; the build modules are imported by the
commands. Wired into the main command with ``main.add_command(build)``.
"""

from __future__ import annotations

import json

import click


def _build_options(command):
    options = [
        click.argument("component", required=False, default="all", metavar="[kernel|qemu|ovmf|all]"),
        click.option("--manifest", metavar="FILE",
                     help="Build manifest (TOML); default: the shipped one (Intel's instructions)."),
        click.option("--workdir", metavar="DIR",
                     help="Where sources, stamps and logs go (default: <state dir>/build)."),
        click.option("-j", "--jobs", type=click.IntRange(min=1), metavar="N",
                     help="Parallel jobs for make and edk2's build (default: number of CPUs)."),
        click.option("--install", is_flag=True,
                     help="Also install the kernel (modules_install, install) and QEMU; needs root."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _prepare(session, component, manifest, workdir, jobs, install):
    from pathlib import Path

    from .build import manifest as manifests
    from .build import steps
    from .host import HostRoot
    from .paths import state_dir

    loaded = manifests.load(manifest)
    components = steps.select(loaded, component)
    ctx = steps.Context(
        manifest=loaded,
        workdir=Path(workdir).resolve() if workdir else state_dir() / "build",
        jobs=jobs or steps.default_jobs(),
        install=install,
        host=session.host if session is not None else HostRoot("/"),
    )
    return ctx, steps.plan(loaded, components, install), components


def _expected_artifacts(ctx, components) -> dict[str, str]:
    from .build import edk2, steps

    expected = {}
    if "kernel" in components:
        expected["kernel bzImage"] = str(ctx.tree("kernel") / "arch/x86/boot/bzImage")
    if "qemu" in components:
        expected["qemu qemu-system-x86_64"] = str(steps.qemu_binary(ctx))
        if ctx.install:
            expected["qemu installed"] = (f"{steps.qemu_prefix(ctx.manifest.qemu.configure)}"
                                          "/bin/qemu-system-x86_64")
    if "ovmf" in components:
        expected["ovmf OVMF.fd"] = edk2.image_path_text(ctx.tree("ovmf"), ctx.manifest.ovmf)
    return expected


def _print_plan(ctx, step_states, components, only_todo: bool) -> None:
    click.echo(f"Manifest:       {ctx.manifest.path}")
    click.echo(f"Work directory: {ctx.workdir} (sources in src/, stamps in stamps/, logs in logs/)")
    click.echo(f"Jobs:           {ctx.jobs}")
    shown = 0
    for state in step_states:
        if only_todo and state.done:
            continue
        shown += 1
        note = "up to date, skipped" if state.done else "to do"
        if state.step.needs_root:
            note += ", needs root"
        click.echo(f"[{state.number}/{len(step_states)}] {state.step.label} ({note})")
        for action in state.step.actions(ctx):
            for line in action.show():
                click.echo(f"    {line}")
    if only_todo and not shown:
        click.echo("Nothing to do: every step is up to date")
    click.echo("Artifacts:")
    for name, path in _expected_artifacts(ctx, components).items():
        click.echo(f"    {name}: {path}")


def _plan_json(ctx, step_states, components) -> dict:
    return {
        "manifest": ctx.manifest.path,
        "workdir": str(ctx.workdir),
        "jobs": ctx.jobs,
        "steps": [
            {"number": s.number, "component": s.step.component, "step": s.step.name,
             "state": "done" if s.done else "todo", "needs_root": s.step.needs_root,
             "commands": [line for action in s.step.actions(ctx) for line in action.show()]}
            for s in step_states
        ],
        "artifacts": _expected_artifacts(ctx, components),
    }


@click.group(name="build")
def build():
    """Build the TDX host kernel, QEMU and OVMF from Intel's patch sets."""


@build.command()
@_build_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def plan(session, component, manifest, workdir, jobs, install, as_json):
    """Print every step and command, and which are up to date; run nothing."""
    from .build.runner import states

    ctx, steps, components = _prepare(session, component, manifest, workdir, jobs, install)
    step_states = states(steps, ctx)
    if as_json:
        click.echo(json.dumps(_plan_json(ctx, step_states, components), indent=2))
    else:
        _print_plan(ctx, step_states, components, only_todo=False)


@build.command()
@_build_options
@click.option("--update", is_flag=True,
              help="Fetch every repository again (new commits on a branch) and redo what changed.")
@click.option("--dry-run", is_flag=True, help="Print the steps that would run; change nothing.")
@click.pass_obj
def run(session, component, manifest, workdir, jobs, install, update, dry_run):
    """Fetch, patch, configure, build (and install) what is not up to date."""
    from .build import artifacts
    from .build.progress import ConsoleReporter
    from .build.runner import require_root, run as run_plan, states

    if install and not dry_run:
        require_root()  # refuse before reading or creating anything
    ctx, steps, components = _prepare(session, component, manifest, workdir, jobs, install)
    if dry_run:
        _print_plan(ctx, states(steps, ctx, update), components, only_todo=True)
        return
    run_plan(steps, ctx, ConsoleReporter(), artifacts.record_file(), update=update)
    _print_builds(artifacts.load(artifacts.record_file()), components)


def _print_builds(record: dict, components) -> None:
    for component in components:
        entry = record.get(component, {})
        for name, path in entry.get("artifacts", {}).items():
            click.echo(f"{component} {name}: {path}")


@build.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(as_json):
    """Show the recorded artifacts and the sources they were built from."""
    import os

    from .build import artifacts

    file = artifacts.record_file()
    record = artifacts.load(file)
    if as_json:
        click.echo(json.dumps(record, indent=2, sort_keys=True))
        return
    if not record:
        click.echo(f"Nothing built yet ({file} does not exist); `tdxvirt build run` builds")
        return
    from tabulate import tabulate

    rows = []
    for component in sorted(record):
        entry = record[component]
        revision = (entry.get("revision") or "?")[:12]
        patched = entry.get("patched_revision")
        if patched and patched != entry.get("revision"):
            revision += f" -> {patched[:12]}"
        paths = entry.get("artifacts", {}) or {"-": ""}
        for name, path in paths.items():
            missing = "" if not path or os.path.exists(path) else " (missing)"
            rows.append([component, name, f"{path}{missing}", entry.get("ref", "?"), revision,
                         ", ".join(entry.get("patches", [])) or "-", entry.get("recorded_at", "?")])
    click.echo(tabulate(rows, headers=["COMPONENT", "ARTIFACT", "PATH", "REF", "REVISION",
                                       "PATCH SETS", "RECORDED"]))
    used = artifacts.builds(record)
    if used:
        click.echo("define uses: " + "; ".join(
            f"{'emulator' if c == 'qemu' else 'loader' if c == 'ovmf' else c} {b.path}"
            for c, b in used.items() if c in ("qemu", "ovmf")))
    click.echo(f"(record: {file})")
