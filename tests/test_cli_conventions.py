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
# selftest is a read: the one TD it defines is its own, and gone when it ends
READS = {"list", "show", "measure", "gpu list", "host check", "build plan", "build status",
         "guest check-config", "guest verify", "guest attest", "sim status", "selftest"}
CHANGES = {"define", "undefine", "gpu detach", "gpu reattach", "gpu cc-mode", "host setup",
           "build run", "build install", "repair", "adopt", "recover", "sim guest-image"}


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
    assert [c for c in READS if "--json" not in options(found[c])] == []
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
    # the host the version is asked of is the one any other command would target: -c after
    # --version, --sim, and TDXVIRT_SIM all count
    for argv, env in (([TDXVIRT, "--version", "-c", sim.qemu_uri], {}),
                      ([TDXVIRT, "--version", "--sim"], {}),
                      ([TDXVIRT, "--version"], {"TDXVIRT_SIM": "1"})):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                              env={**os.environ, **env})
        assert done.returncode == 0 and "libvirt daemon 12." in done.stdout, (argv, env)
        assert sim.qemu_uri in done.stdout, (argv, env)


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


def test_list_all_is_virshs_habit_and_foreign_adds_other_tools_tds(sim, qemu_conn):
    """virsh's --all means "shut-off ones too": tdxvirt lists those anyway, so --all
    changes nothing; other tools' TDX domains come with --foreign, marked as theirs."""
    import json

    from conftest import run_sim

    name = f"other-{uuid.uuid4().hex[:8]}"
    xml = run_sim("define", name, "--gpu", "38:00.0", "--allow-shared", "--memory", "1G",
                  "--print-xml").stdout
    # the same TD as another tool would define it: no tdxvirt metadata, no record
    foreign = qemu_conn.defineXML(xml.split("<metadata>")[0] + xml.split("</metadata>")[1])
    try:
        plain = json.loads(run_sim("list", "--json").stdout)
        assert json.loads(run_sim("list", "--all", "--json").stdout) == plain
        assert name not in [r["name"] for r in plain]
        rows = {r["name"]: r for r in json.loads(run_sim("list", "--foreign", "--json").stdout)}
        assert rows[name]["managed_by_tdxvirt"] is False and rows[name]["tdx"] is True
        table = run_sim("list", "--foreign").stdout
        assert "DEFINED BY" in table.splitlines()[0]
        assert next(line for line in table.splitlines() if line.startswith(name)).endswith("other")
    finally:
        foreign.undefine()


def test_a_second_boot_disk_is_refused_not_dropped(run, gpu_host, tmp_path):
    """click keeps the last of a repeated option: a first --disk or --image would vanish
    without a word. Refused, with where data disks go."""
    from conftest import one_line_error

    _, gpu = gpu_host
    first, second = tmp_path / "a.raw", tmp_path / "b.raw"
    for disk in (first, second):
        disk.write_bytes(b"\0" * 4096)
    for option in ("--disk", "--image"):
        line = one_line_error(run("define", "two-disks", "--gpu", gpu, option, str(first),
                                  option, str(second)), 2)
        assert f"'{option}': given 2 times" in line and "virt-xml NAME --add-device --disk" in line


def test_show_speaks_virshs_words_with_disks_and_nics(run, gpu_host, tmp_path):
    """`show` as dominfo + domblklist + domiflist would put it, not Python's repr."""
    _, gpu = gpu_host
    image = tmp_path / "base.raw"
    image.write_bytes(b"\0" * 65536)
    name = f"shown-{uuid.uuid4().hex[:6]}"
    assert run("define", name, "--gpu", gpu, "--disk", str(image), "--network",
               "network=default").exit_code == 0
    try:
        shown = run("show", name).stdout
        assert "True" not in shown and "False" not in shown and "_" not in shown.split(":")[0]
        lines = shown.splitlines()
        assert lines[0].split() == ["Name:", name]
        assert any(line.split()[:2] == ["Persistent:", "yes"] for line in lines)
        disk = next(line for line in lines if str(image) in line).split()
        assert disk[:2] == ["vda", "disk"]
        nic = next(line for line in lines if line.strip().startswith("network")).split()
        assert nic[:3] == ["network", "default", "virtio"]
        assert lines[-1].split() == ["Problems:", "none"]
    finally:
        run("undefine", name)


_SIM_AS_NOBODY = """
import os
from click.testing import CliRunner
from tdxvirt.cli import main
import tdxvirt.cli.remedies, tdxvirt.gpu.privilege, tdxvirt.textsafe, tdxvirt.virt.conn
# Python lives under /root here, which an ordinary user cannot read: import first.
os.setgroups([]); os.setgid(65534); os.setuid(65534)
result = CliRunner().invoke(main, ["--sim", "list"])
print(result.exit_code)
print(result.stderr.strip())
"""


def test_sim_as_another_user_says_it_needs_root():
    """Not "not installed" (another user's state directory has no simulated host): the
    simulated host is root's, and one line says so."""
    done = subprocess.run([sys.executable, "-c", _SIM_AS_NOBODY], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    code, line = done.stdout.splitlines()
    assert code == "1" and line.startswith("tdxvirt: error: --sim needs root"), line
    assert "run it with sudo" in line
