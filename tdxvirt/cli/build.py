"""``tdxvirt build plan|run|status|install``: the TDX kernel, QEMU and OVMF from a manifest.

``plan`` and ``run`` start by saying which components this host already has from its
distribution (``build.distro``) and plan only the others; ``--all`` plans every one.
Only click is imported here at start-up; the build modules are imported by the
commands. Wired into the main command with ``main.add_command(build)``.
"""

from __future__ import annotations

import json

import click


def _build_options(command):
    options = [
        click.argument("component", required=False, default="all", metavar="[kernel|qemu|ovmf|all]"),
        click.option("--manifest", metavar="NAME|FILE",
                     help="Build manifest: a shipped one by name (upstream, the default: released "
                          "Linux, QEMU and edk2; intel-device-passthrough: Intel's "
                          "2024 device-passthrough stack) or a TOML file."),
        click.option("--workdir", metavar="DIR",
                     help="Where sources, stamps and logs go (default: <state dir>/build)."),
        click.option("-j", "--jobs", type=click.IntRange(min=1), metavar="N",
                     help="Parallel jobs for make and edk2's build (default: number of CPUs)."),
        click.option("--install", is_flag=True,
                     help="Also install the kernel (modules_install, install) and QEMU; needs root."),
        click.option("--root", "root", default="/", metavar="DIR",
                     help="With --install: install QEMU below this folder instead of / (make install "
                          "DESTDIR=DIR), e.g. the root of the simulated host's Debian, keeping the "
                          "paths it was configured with as that system sees them. QEMU only."),
        click.option("--deb", is_flag=True,
                     help="Build the kernel as Debian packages (make bindeb-pkg, release suffix "
                          "-tdxvirt) and record the .deb files; with --install, dpkg -i the image "
                          "and headers packages. As the manifest's [kernel] package = \"deb\"."),
        click.option("--all", "build_all", is_flag=True,
                     help="Plan every component, also those this host's distribution already has."),
        click.option("--source", "source_path", metavar="DIR|TARBALL",
                     help="Build the one COMPONENT named from this local source instead of fetching "
                          "it: a git checkout with its submodules, an unpacked tree, or a release "
                          "tarball (QEMU's ships its subprojects). It is copied, never written to."),
        click.option("--mirror", "mirrors", multiple=True, metavar="PREFIX=MIRROR",
                     help="Fetch URLs starting with PREFIX from MIRROR instead, submodules too "
                          "(e.g. https://github.com/=/srv/mirrors/); repeatable, added to the "
                          "manifest's [mirrors]. Only tdxvirt's git commands get it."),
        click.option("--all-submodules", is_flag=True,
                     help="Fetch every submodule, not only those the manifest names as the "
                          "build's (edk2: 7 of its 13 for OVMF)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


class _Selection:
    """What the host has, what was asked for, and what is planned of it."""

    def __init__(self, report, manifest, component: str, selected, build_all: bool):
        self.report = report
        self.build_all = build_all
        self.selected = tuple(selected)  # the components asked for (in the manifest)
        self.planned = self.selected if build_all else tuple(
            name for name in self.selected if report.get(name).planned)
        # missing here, but the manifest has no table to build it from
        self.unbuildable = () if component != "all" or build_all else tuple(
            f.component for f in report.findings
            if f.planned and f.component not in manifest.components())


def _prepare(session, component, manifest, workdir, jobs, install, build_all, mirrors=(), source_path=None,
             deb=False, all_submodules=False, root="/"):
    from pathlib import Path

    from ..build import distro, steps
    from ..build import manifest as manifests
    from ..host import HostRoot
    from ..paths import state_dir

    loaded = manifests.with_mirrors(manifests.load(manifest), tuple(mirrors))
    loaded = manifests.with_kernel_package(loaded, "deb" if deb else None)
    loaded = manifests.with_all_submodules(loaded, all_submodules)
    build_all = build_all or source_path is not None  # a source given is built, whatever the host has
    selected = steps.select(loaded, component)
    steps.check_install_root(selected, install, Path(root).resolve())
    host = session.host if session is not None else HostRoot("/")
    selection = _Selection(distro.check(host), loaded, component, selected, build_all)
    ctx = steps.Context(
        manifest=loaded,
        workdir=Path(workdir).resolve() if workdir else state_dir() / "build",
        jobs=jobs or steps.default_jobs(),
        install=install,
        host=host,
        root=Path(root).resolve(),
    )
    return ctx, steps.plan(loaded, selection.planned, install, _sources(component, source_path)), selection


def _sources(component: str, source_path: str | None) -> dict:
    """``--source``: the one component it is for, and its path, checked now."""
    from pathlib import Path

    from ..build import source
    from ..errors import InputError

    if source_path is None:
        return {}
    if component == "all":
        raise InputError("--source builds one component: name it (`tdxvirt build run ovmf --source DIR`)")
    path = Path(source_path).resolve()
    source.kind_of(path)  # refuses what is neither a folder nor a tarball, in one line
    return {component: path}


_STATE_LABELS = {"present": "has it", "missing": "missing", "unknown": "unknown"}
_NAMES = {"kernel": "kernel", "qemu": "QEMU", "ovmf": "OVMF", "libvirt": "libvirt"}


def _names(components) -> str:
    names = [_NAMES[c] for c in components]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _print_distribution(selection) -> None:
    """What the host has, then what is planned, or that nothing is."""
    report = selection.report
    click.echo(f"What this host has from its distribution (host root {report.root}):")
    for finding in report.findings:
        click.echo(f"    {finding.component:<8} {_STATE_LABELS[finding.state]:<8} {finding.detail}")
    if selection.build_all:
        click.echo(f"Planned: {', '.join(selection.planned)} (--all: also what this host has)")
    elif selection.planned:
        click.echo(f"Planned: {', '.join(selection.planned)} (what this host lacks or cannot "
                   "tell; --all plans every component)")
    else:
        click.echo(f"Nothing to build: this host has {_names(selection.selected)} with TDX "
                   "(--all plans them anyway)")
    if selection.unbuildable:
        click.echo(f"Not planned: {', '.join(selection.unbuildable)} (missing here, but the "
                   "manifest has no table for it)")


def _expected_artifacts(ctx, components) -> dict[str, str]:
    from ..build import edk2, steps

    expected = {}
    if "kernel" in components:
        expected["kernel bzImage"] = str(ctx.tree("kernel") / "arch/x86/boot/bzImage")
        if ctx.manifest.kernel.package == "deb":
            for package in steps.DEB_PACKAGES[:3]:  # the -dbg one only with CONFIG_DEBUG_INFO
                name = package if package == "linux-libc-dev" else f"{package}-<release>"
                expected[f"kernel {package}.deb"] = f"{ctx.workdir}/src/{name}_<version>_<arch>.deb"
    if "qemu" in components:
        expected["qemu qemu-system-x86_64"] = str(steps.qemu_binary(ctx))
        if ctx.install:
            (name, path), = steps.QemuInstall().results(ctx).items()
            expected[f"qemu {name}"] = path
    if "ovmf" in components:
        expected["ovmf OVMF.fd"] = edk2.image_path_text(ctx.tree("ovmf"), ctx.manifest.ovmf)
    return expected


def _missing_prerequisites(ctx, step_states):
    from ..build.runner import missing_prerequisites

    return missing_prerequisites([s.step for s in step_states if not s.done], ctx)


def _print_prerequisites(ctx, step_states) -> None:
    """One line: what the steps to run need and this machine lacks, or that all is there."""
    missing = _missing_prerequisites(ctx, step_states)
    if missing.by_component:
        click.echo(f"Prerequisites: {missing.describe()}")
    elif any(not s.done for s in step_states):
        click.echo("Prerequisites: every tool and library the steps to run need is installed")


def _print_plan(ctx, step_states, selection, only_todo: bool) -> None:
    _print_distribution(selection)
    if not selection.planned:
        return
    _print_prerequisites(ctx, step_states)
    components = selection.planned
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


def _plan_json(ctx, step_states, selection) -> dict:
    components = selection.planned
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
        # what the host has, and what of the asked-for components is planned
        "distribution": selection.report.to_json(),
        "selected": list(selection.selected),
        "planned": list(components),
        "all": selection.build_all,
        "prerequisites": _prerequisites_json(_missing_prerequisites(ctx, step_states)),
    }


def _prerequisites_json(missing) -> dict:
    return {"missing": {component: [{"name": n.name, "package": n.package} for n in needs]
                        for component, needs in missing.by_component.items()},
            "install": missing.install_command() if missing.by_component else None}


@click.group(name="build")
def build():
    """Build the TDX host kernel, QEMU and OVMF this host's distribution lacks."""


@build.command()
@_build_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def plan(session, component, manifest, workdir, jobs, install, root, deb, build_all, source_path, mirrors,
         all_submodules, as_json):
    """Say what this host has; print every step and command of the rest; run nothing."""
    from ..build.runner import states

    ctx, steps, selection = _prepare(session, component, manifest, workdir, jobs, install, build_all, mirrors,
                                     source_path, deb, all_submodules, root)
    step_states = states(steps, ctx)
    if as_json:
        click.echo(json.dumps(_plan_json(ctx, step_states, selection), indent=2))
    else:
        _print_plan(ctx, step_states, selection, only_todo=False)


@build.command()
@_build_options
@click.option("--update", is_flag=True,
              help="Fetch every repository again (new commits on a branch) and redo what changed.")
@click.option("--dry-run", is_flag=True, help="Print the steps that would run; change nothing.")
@click.pass_obj
def run(session, component, manifest, workdir, jobs, install, root, deb, build_all, source_path, mirrors,
        all_submodules, update, dry_run):
    """Fetch, patch, configure, build (and install) what is not up to date."""
    from ..build import artifacts
    from ..build.progress import ConsoleReporter
    from ..build.runner import require_root, states
    from ..build.runner import run as run_plan

    if install and not dry_run:
        require_root()  # refuse before reading or creating anything
    ctx, steps, selection = _prepare(session, component, manifest, workdir, jobs, install, build_all, mirrors,
                                     source_path, deb, all_submodules, root)
    if dry_run:
        _print_plan(ctx, states(steps, ctx, update), selection, only_todo=True)
        return
    _print_distribution(selection)
    if not selection.planned:
        return
    run_plan(steps, ctx, ConsoleReporter(), artifacts.record_file(), update=update)
    record = artifacts.load(artifacts.record_file())
    _print_builds(record, selection.planned)
    _warn_without_tdx(record, selection.planned)


def _print_builds(record: dict, components) -> None:
    for component in components:
        entry = record.get(component, {})
        for name, path in entry.get("artifacts", {}).items():
            click.echo(f"{component} {name}: {path}")


def _warn_without_tdx(record: dict, components) -> None:
    """Say so when the QEMU built cannot run TDs: a source older than 10.1 builds fine
    (Debian 13's QEMU 10.0 did) and has no tdx-guest object."""
    from ..build.distro import TDX_OBJECT, parse_object_help
    from ..host.commands import SubprocessRunner

    binary = (record.get("qemu", {}).get("artifacts") or {}).get("qemu-system-x86_64") \
        if "qemu" in components else None
    if not binary:
        return
    result = SubprocessRunner().run((binary, "-object", "help"), timeout=30)
    if not result.ok:
        click.echo(f"warning: `{binary} -object help` failed ({result.tail() or result.returncode}): "
                   f"whether this QEMU has {TDX_OBJECT} is unknown", err=True)
    elif TDX_OBJECT not in parse_object_help(result.stdout):
        click.echo(f"warning: {binary} has no {TDX_OBJECT} object (-object help): it cannot run TDs; "
                   "QEMU has TDX from 10.1 (the upstream manifest's ref), older ones only with "
                   "TDX patches", err=True)


@build.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(as_json):
    """Show the recorded artifacts, their SHA-256, and the sources they were built from;
    flag an artifact whose file changed or is gone since it was recorded."""
    from ..build import artifacts

    file = artifacts.record_file()
    record = artifacts.load(file)
    checks = artifacts.check_record(record)
    if as_json:
        shown = {component: {**entry, "checks": {name: {"state": c.state, "detail": c.detail}
                                                 for name, c in checks.get(component, {}).items()}}
                 if isinstance(entry, dict) else entry for component, entry in record.items()}
        click.echo(json.dumps(shown, indent=2, sort_keys=True))
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
        recorded = entry.get("digests") or {}
        for name, path in paths.items():
            check = checks.get(component, {}).get(name)
            note = f" ({check.state})" if check is not None and check.state in ("missing", "changed") else ""
            digest = recorded.get(name) if isinstance(recorded.get(name), dict) else {}
            rows.append([component, name, f"{path}{note}", str(digest.get("sha256", "-"))[:16],
                         digest.get("size", "-"), entry.get("ref", "?"), revision,
                         ", ".join(entry.get("patches", [])) or "-", entry.get("recorded_at", "?")])
    click.echo(tabulate(rows, headers=["COMPONENT", "ARTIFACT", "PATH", "SHA-256", "SIZE", "REF", "REVISION",
                                       "PATCH SETS", "RECORDED"]))
    for component, found in sorted(checks.items()):
        for name, check in found.items():
            # a file still there keeps its build step done: it must go before a rebuild
            remedy = "" if check.state == "missing" else "remove it, then "
            if check.state in ("missing", "changed", "unreadable"):
                click.echo(f"NOT AS BUILT: {component} {name}: {check.detail}; {remedy}"
                           f"`tdxvirt build run {component}` builds and records it again")
            elif check.state == "unrecorded":
                click.echo(f"no digest: {component} {name}: {check.detail}")
    from ..build import install_record

    installed = install_record.load(install_record.record_file())
    _print_installed(installed)
    used = artifacts.builds(record, installed)
    if used:
        click.echo("define uses: " + "; ".join(
            f"{'emulator' if c == 'qemu' else 'loader' if c == 'ovmf' else c} {b.path}"
            for c, b in used.items() if c in ("qemu", "ovmf")))
    click.echo(f"(record: {file})")


def _print_installed(installed: dict) -> None:
    """What `build install` wrote, each file checked against what it wrote."""
    from ..build import digests

    for component, entry in sorted(installed.items()):
        for path, recorded in sorted((entry.get("files") or {}).items() if isinstance(entry, dict) else ()):
            check = digests.check(path, recorded)
            note = "" if check.ok else f" ({check.state}: `tdxvirt build install {component}` writes it again)"
            click.echo(f"installed: {component} {path}{note}")


@build.command(name="install")
@click.argument("component", required=False, default="all", type=click.Choice(["ovmf", "qemu", "all"]),
                metavar="[ovmf|qemu|all]")
@click.option("--dry-run", is_flag=True, help="Print every file it would write (with --revert: remove); "
                                              "change nothing.")
@click.option("--revert", is_flag=True, help="Remove the files an earlier install wrote (as recorded, "
                                             "each only while unchanged), nothing else.")
@click.option("--root", "root", default="/", metavar="DIR",
              help="Install below this folder instead of / (an image being prepared); define uses "
                   "only what is installed below /.")
def install(component, dry_run, revert, root):
    """Make the built OVMF usable by libvirt: copy it to /usr/local/share/tdxvirt/firmware/
    under its SHA-256 and write a QEMU firmware descriptor (feature intel-tdx) for it to
    /etc/qemu/firmware; check the built QEMU that define names as the emulator."""
    from pathlib import Path

    from ..build import artifacts, install_record
    from ..build import install as installer
    from ..errors import InputError

    if not dry_run:
        installer.require_root()  # refuse before reading or creating anything
    base = Path(root).resolve()
    if not base.is_dir():
        raise InputError(f"--root {root}: not a folder; give an existing folder (or leave --root out for /)")
    components = installer.COMPONENTS if component == "all" else (component,)
    record = install_record.record_file()
    if revert:
        removal = installer.revert_plan(components, install_record.load(record))
        if not (removal.files or removal.gone or removal.folders):
            click.echo(f"Nothing to revert: {record} records no files of {', '.join(components)}")
            return
        if dry_run:
            click.echo("Dry run; revert would:")
            for line in installer.show_revert(removal):
                click.echo(f"    {line}")
            return
        for line in installer.show_revert(installer.revert(components, record), done=True):
            click.echo(line)
        return
    found = installer.plan(components, base, artifacts.record_file(), install_record.load(record))
    lines = installer.show(found, record)
    if dry_run:
        click.echo("Dry run; install would:" if found.writes else "Dry run; nothing to write:")
        for line in lines:
            click.echo(f"    {line}")
    else:
        installer.apply(found, record)
        for line in lines:
            click.echo(line.replace("copy ", "copied ", 1).replace("write ", "wrote ", 1)
                       .replace("record what was written in ", "recorded in ", 1))
    for note in found.notes:
        click.echo(note)
