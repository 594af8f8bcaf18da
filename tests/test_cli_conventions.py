"""What users expect of every command: --json to read, --dry-run to change, completion,
--version."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import click
from click.testing import CliRunner

from tdxvirt.cli import main
from tdxvirt.cli.reference import commands

TDXVIRT = os.path.join(os.path.dirname(sys.executable), "tdxvirt")
# Commands that neither need --json nor change anything, or change one domain's state
# in libvirt the way virsh does (no files, no host configuration), each with why.
NO_JSON = {
    "console": "interactive: hands the terminal to virsh console",
    "sim exec": "runs the user's command, whose output is its own",
    "xml": "prints the domain XML itself",
}
NO_DRY_RUN = {
    "start": "one libvirt state change, after a preflight that changes nothing",
    "stop": "one libvirt state change", "destroy": "one libvirt state change",
    "reboot": "one libvirt state change", "autostart": "one libvirt flag",
    "sim up": "the simulated host's own daemons, below the state directory",
    "sim down": "the simulated host's own daemons, below the state directory",
    "sim restart": "the simulated host's libvirt daemon, below the state directory",
    "sim exec": "runs the user's command in the simulated host's network; changes nothing itself",
}
READS = {"list", "show", "measure", "gpu list", "host check", "build plan", "build status",
         "guest check-config", "guest verify", "guest attest", "sim status"}
CHANGES = {"define", "undefine", "gpu detach", "gpu reattach", "gpu cc-mode", "host setup",
           "build run", "repair", "adopt", "recover", "sim guest-image"}


def leaf_commands() -> dict[str, click.Command]:
    return {" ".join(path[1:]): command for path, command, _ in commands()
            if not isinstance(command, click.Group)}


def options(command: click.Command) -> set[str]:
    return {opt for param in command.params for opt in getattr(param, "opts", [])}


def test_every_command_is_classified():
    known = READS | CHANGES | set(NO_JSON) | set(NO_DRY_RUN)
    assert set(leaf_commands()) == known, "classify the new command here (read or change)"


def test_reads_have_json_and_changes_have_dry_run():
    found = leaf_commands()
    assert [c for c in READS - {"sim status"} if "--json" not in options(found[c])] == []
    assert [c for c in CHANGES if "--dry-run" not in options(found[c])] == []


def test_version_names_tdxvirt_and_libvirts_library_and_daemon(sim):
    done = subprocess.run([TDXVIRT, "-c", sim.qemu_uri, "--version"], capture_output=True,
                          text=True, timeout=30)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and lines[0].startswith("tdxvirt ")
    assert lines[1].startswith("libvirt library ")
    assert lines[2].startswith("libvirt daemon 12.") and sim.qemu_uri in lines[2]
    gone = subprocess.run([TDXVIRT, "-c", "qemu+unix:///system?socket=/nonexistent", "--version"],
                          capture_output=True, text=True, timeout=30)
    assert gone.returncode == 0 and "libvirt daemon: not reachable" in gone.stdout


def complete(*words: str) -> list[str]:
    """What bash completion offers after these words (click's own protocol)."""
    env = {**os.environ, "_TDXVIRT_COMPLETE": "bash_complete",
           "COMP_WORDS": " ".join(("tdxvirt", *words)), "COMP_CWORD": str(len(words))}
    done = subprocess.run([TDXVIRT], env=env, capture_output=True, text=True, timeout=30)
    return [line.split(",", 1)[1] for line in done.stdout.splitlines() if "," in line]


def test_completion_of_td_names_and_gpu_addresses(sim, qemu_conn):
    name = f"cmp-{uuid.uuid4().hex[:8]}"
    runner = CliRunner()
    assert runner.invoke(main, ["--sim", "define", name, "--gpu", "38:00.0", "--allow-shared",
                                "--memory", "1G", "--vcpus", "1"]).exit_code == 0
    try:
        assert complete("--sim", "show", name[:6]) == [name]
        assert "0000:38:00.0" in complete("--sim", "define", "x", "--gpu", "")
        assert "0000:38:00.0" in complete("--sim", "gpu", "detach", "38")
    finally:
        runner.invoke(main, ["--sim", "undefine", name])


def test_define_and_undefine_dry_runs_change_nothing(sim, qemu_conn, tmp_path):
    name = f"dry-{uuid.uuid4().hex[:8]}"
    runner = CliRunner()
    dry = runner.invoke(main, ["--sim", "define", name, "--gpu", "38:00.0", "--allow-shared",
                               "--dry-run"])
    assert dry.exit_code == 0 and "(dry run: nothing was changed)" in dry.output
    assert name not in qemu_conn.listDefinedDomains()
    assert runner.invoke(main, ["--sim", "define", name, "--gpu", "38:00.0",
                                "--allow-shared"]).exit_code == 0
    try:
        dry = runner.invoke(main, ["--sim", "undefine", name, "--remove-storage", "--dry-run"])
        assert dry.exit_code == 0 and dry.output.startswith(f"Would undefine '{name}'")
        assert name in qemu_conn.listDefinedDomains()
    finally:
        assert runner.invoke(main, ["--sim", "undefine", name]).exit_code == 0


def test_completion_drops_names_that_would_forge_candidates_and_quotes_globs(sim, conn):
    """Names libvirt's rename lets any of its users give: a newline would forge a second
    candidate (click's bash protocol is one per line), an escape or a quote would reach
    the shell raw; glob characters are quoted (click's bash script expands unquoted)."""
    tag = f"cmp-{uuid.uuid4().hex[:6]}"
    names = [f"{tag}-a*b", f"{tag}-x\nforged", f"{tag}-e\x1b[31m", f"{tag}-it's", f"{tag}-plain"]
    domains = []
    try:
        for index, name in enumerate(names):
            domain = conn.defineXML(
                f"<domain type='test'><name>{tag}-{index}</name><memory>65536</memory>"
                "<os><type>hvm</type></os></domain>")
            domain.rename(name, 0)
            domains.append(conn.lookupByUUIDString(domain.UUIDString()))
        offered = complete("-c", sim.test_uri, "show", tag)
        assert sorted(offered) == sorted([f"{tag}-a\\*b", f"{tag}-plain"]), offered
        assert not any(word.startswith("forged") for word in offered)
    finally:
        for domain in domains:
            domain.undefine()


def test_a_command_group_alone_prints_its_help():
    """`tdxvirt`, `tdxvirt gpu` ...: the help on stdout and exit 0 (it was one error line
    holding the whole help with literal \\n)."""
    groups = [""] + sorted({" ".join(path[1:]) for path, command, _ in commands()
                            if isinstance(command, click.Group) and len(path) > 1})
    for group in groups:
        done = subprocess.run([TDXVIRT, *group.split()], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stderr == "", (group, done.stderr)
        assert done.stdout.startswith(f"Usage: tdxvirt {group}".rstrip() + " [OPTIONS] COMMAND"), group
        assert "\\n" not in done.stdout and "Commands:" in done.stdout
