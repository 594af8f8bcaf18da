"""Issue #18: `--host-root DIR` must not run DIR's programs as root unless asked for.

Each attack is performed: a fake root gets a working /bin/sh (this machine's dash and
its libraries) and a hostile ``usr/bin/qemu-system-x86_64`` or ``usr/sbin/grubby``
script that leaves a marker file when it runs, inside a chroot or not. First the
attack is shown to be real (an explicitly opted-in runner does run it), then
``host check`` and every ``--dry-run`` must leave no marker, and a real ``host setup``
below the root needs ``--run-below-root`` and a tree only root can change.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import one_line_error
from test_doctor_host import tdx_ready_root
from test_hostcfg_setup import GRUB, QEMU_CONF, debian_host, snapshot

from tdxvirt.cli import main
from tdxvirt.host import HostRoot
from tdxvirt.host.commands import NOT_RUN, RecordingRunner, RefusingRunner, SubprocessRunner, host_runner
from tdxvirt.hostcfg.setup import SetupOptions, setup

NOBODY = 65534
MARKER = "tdxvirt-pwned"
UNREACHABLE = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
# Lands in the root's top directory however the script is started: by the chroot
# ($0 = /usr/bin/...) or from outside it ($0 = DIR/usr/bin/...).
HOSTILE = f"""#!/bin/sh
: > "${{0%/*}}/../../{MARKER}"
echo "QEMU emulator version 11.1.0"
"""
RECORDER = """#!/bin/sh
echo "$0 $*" >> "${0%/*}/../../ran"
"""


def give_shell(base: Path) -> None:
    """This machine's /bin/sh and the libraries it loads, copied into a fake root."""
    shell = Path(os.path.realpath("/bin/sh"))
    wanted = [(shell, "/bin/sh")]
    listing = subprocess.run(["ldd", str(shell)], capture_output=True, text=True, check=True)
    for line in listing.stdout.splitlines():
        match = re.search(r"(/\S+) \(0x", line)
        if match:
            wanted.append((Path(os.path.realpath(match[1])), match[1]))
    for source, inside in wanted:
        target = base / inside.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def plant(base: Path, inside: str, text: str = HOSTILE) -> Path:
    path = base / inside.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def marked(base: Path) -> bool:
    return (base / MARKER).exists()


def invoke(*args, env=None):
    result = CliRunner().invoke(main, list(args), env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.fixture
def hostile_qemu(tmp_path) -> Path:
    base = tmp_path / "root"
    tdx_ready_root(base)
    give_shell(base)
    plant(base, "/usr/bin/qemu-system-x86_64")
    return base


@pytest.fixture
def hostile_grubby(tmp_path) -> Path:
    """A BLS (grubby) Debian-like host whose grubby is hostile."""
    base = debian_host(tmp_path / "root", grubby=True)
    (base / GRUB).unlink()
    give_shell(base)
    plant(base, "/usr/sbin/grubby")
    return base


# --- the attack is real ---------------------------------------------------------------

def test_an_explicitly_chosen_runner_does_run_the_trees_program(hostile_qemu):
    """What `host check` did before: run DIR's QEMU through chroot, as root."""
    result = SubprocessRunner(HostRoot(hostile_qemu)).run(("qemu-system-x86_64", "--version"))
    assert result.ok, result.stderr
    assert marked(hostile_qemu)


# --- host check -----------------------------------------------------------------------

@pytest.mark.parametrize("through", ["option", "environment"])
def test_host_check_never_runs_qemu_below_a_host_root(hostile_qemu, through):
    args = ["-c", UNREACHABLE, "host", "check", "--json"]
    if through == "option":
        result = invoke("--host-root", str(hostile_qemu), *args)
    else:
        result = invoke(*args, env={"TDXVIRT_HOST_ROOT": str(hostile_qemu)})
    assert not marked(hostile_qemu)
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    for name in ("qemu: tdx-guest", "qemu: version"):
        assert checks[name]["status"] == "skip"
        assert checks[name]["found"] == (f"/usr/bin/qemu-system-x86_64: {NOT_RUN} "
                                         f"(host root {hostile_qemu})")


def test_host_check_table_says_skipped(hostile_qemu):
    result = invoke("-c", UNREACHABLE, "--host-root", str(hostile_qemu), "host", "check")
    assert not marked(hostile_qemu)
    row = next(line for line in result.stdout.splitlines() if line.startswith("qemu: tdx-guest"))
    assert " skip " in row and "skipped: not run below a host" in row  # the cell wraps there


def test_the_doctor_runs_nothing_below_a_root_by_default(hostile_qemu):
    from tdxvirt.doctor import qemu
    from tdxvirt.doctor.context import Context

    ctx = Context(HostRoot(hostile_qemu))
    assert isinstance(ctx.runner, RefusingRunner) and not ctx.runs_programs
    assert [c.status for c in qemu.checks(ctx)] == ["skip", "skip"]
    assert ctx.runner.calls == [] and not marked(hostile_qemu)
    assert isinstance(host_runner(HostRoot("/")), SubprocessRunner)
    assert isinstance(host_runner(HostRoot(hostile_qemu)), RefusingRunner)


# --- host setup --dry-run ------------------------------------------------------------------

def test_setup_dry_run_never_runs_grubby_below_a_host_root(hostile_grubby):
    before = snapshot(hostile_grubby)
    result = invoke("--host-root", str(hostile_grubby), "host", "setup", "--dry-run")
    assert result.exit_code == 0, result.output
    assert not marked(hostile_grubby)
    assert snapshot(hostile_grubby) == before
    assert ("warning: kernel arguments: `grubby --info=ALL` skipped: not run below a host "
            "root other than /; a real run adds whichever of `intel_iommu=on iommu=pt "
            "kvm_intel.tdx=on nohibernate` a kernel lacks with `grubby --update-kernel=ALL "
            "'--args=intel_iommu=on iommu=pt kvm_intel.tdx=on nohibernate'`") in result.stdout
    assert result.stdout.rstrip().endswith("(dry run: nothing was changed)")


def test_revert_dry_run_never_runs_grubby_either(hostile_grubby):
    result = invoke("--host-root", str(hostile_grubby), "host", "setup", "--revert", "--dry-run")
    assert result.exit_code == 0, result.output
    assert not marked(hostile_grubby)


def test_dry_run_with_run_below_root_still_runs_nothing(hostile_grubby):
    result = invoke("--host-root", str(hostile_grubby), "host", "setup", "--dry-run",
                    "--run-below-root")
    assert result.exit_code == 0, result.output
    assert not marked(hostile_grubby)


# --- a real host setup below another root ---------------------------------------------------

def test_real_setup_below_a_root_needs_run_below_root(hostile_grubby):
    before = snapshot(hostile_grubby)
    for env in (None, {"TDXVIRT_HOST_ROOT": str(hostile_grubby)}):
        args = ["host", "setup"] if env else ["--host-root", str(hostile_grubby), "host", "setup"]
        line = one_line_error(invoke(*args, env=env), 2)
        assert line == (
            f"tdxvirt: error: host setup below host root {hostile_grubby} would run that "
            "tree's own programs (grubby, update-grub, systemctl, udevadm) as root, and a "
            "chroot does not contain root: pass --run-below-root if it is a system tree you "
            "trust, or see what setup would do with --dry-run")
    assert not marked(hostile_grubby) and snapshot(hostile_grubby) == before


def test_run_below_root_refuses_a_root_others_can_write(hostile_grubby):
    before = snapshot(hostile_grubby)
    hostile_grubby.chmod(0o775)
    line = one_line_error(invoke("--host-root", str(hostile_grubby), "host", "setup",
                                 "--run-below-root"), 1)
    assert f"host root {hostile_grubby}: {hostile_grubby} is writable by its group or " \
           f"others" in line and f"`chmod go-w {hostile_grubby}`" in line
    assert not marked(hostile_grubby) and snapshot(hostile_grubby) == before


@pytest.mark.parametrize("spoil", ["program writable", "program not root's",
                                   "directory not root's"])
def test_run_below_root_refuses_a_program_others_can_change(hostile_grubby, spoil):
    before = snapshot(hostile_grubby)
    grubby = hostile_grubby / "usr/sbin/grubby"
    if spoil == "program writable":
        grubby.chmod(0o777)
        culprit, fault = grubby, "is writable by its group or others"
    elif spoil == "program not root's":
        os.chown(grubby, NOBODY, NOBODY)
        culprit, fault = grubby, f"is owned by uid {NOBODY}, not root"
    else:
        os.chown(grubby.parent, NOBODY, NOBODY)
        culprit, fault = grubby.parent, f"is owned by uid {NOBODY}, not root"
    line = one_line_error(invoke("--host-root", str(hostile_grubby), "host", "setup",
                                 "--run-below-root"), 1)
    assert line.startswith(f"tdxvirt: error: grubby below host root {hostile_grubby}: "
                           f"{culprit} {fault}")
    assert not marked(hostile_grubby) and snapshot(hostile_grubby) == before


def test_a_program_missing_below_the_root_stops_setup_before_any_change(tmp_path):
    base = debian_host(tmp_path / "root")  # update-grub present, no systemctl in the tree
    give_shell(base)
    plant(base, "/usr/sbin/update-grub", RECORDER)
    before = snapshot(base)
    line = one_line_error(invoke("--host-root", str(base), "host", "setup",
                                 "--run-below-root"), 1)
    assert line == (f"tdxvirt: error: systemctl: command not found below host root {base}")
    assert snapshot(base) == before and not (base / "ran").exists()


def test_run_below_root_runs_the_trees_programs_inside_it(tmp_path):
    """The explicit opt-in still works end to end, chroot and all, and reverts."""
    base = debian_host(tmp_path / "root")
    give_shell(base)
    plant(base, "/usr/sbin/update-grub", RECORDER)
    plant(base, "/usr/bin/systemctl", RECORDER)
    before = snapshot(base)
    result = invoke("--host-root", str(base), "host", "setup", "--run-below-root")
    assert result.exit_code == 0, result.output
    assert (base / "ran").read_text().splitlines() == [
        "/usr/sbin/update-grub ", "/usr/bin/systemctl restart libvirtd.service"]
    assert b'user = "libvirt-qemu"' in (base / QEMU_CONF).read_bytes()
    result = invoke("--host-root", str(base), "host", "setup", "--revert", "--run-below-root")
    assert result.exit_code == 0, result.output
    after = snapshot(base)
    after.pop("ran")
    assert after == before


def test_the_library_keeps_its_explicit_runner(hostile_grubby):
    """setup() runs what it is given: a recording runner below a root, as tests do."""
    runner = RecordingRunner()
    setup(HostRoot(hostile_grubby), runner, SetupOptions(), lambda step: None, dry_run=True)
    assert runner.calls == [["grubby", "--info=ALL"]] and not marked(hostile_grubby)


def test_run_below_root_refuses_a_script_whose_interpreter_others_can_change(hostile_grubby):
    """The kernel runs a script's #! interpreter as root too."""
    before = snapshot(hostile_grubby)
    shell = hostile_grubby / "bin/sh"
    shell.chmod(0o777)
    line = one_line_error(invoke("--host-root", str(hostile_grubby), "host", "setup",
                                 "--run-below-root"), 1)
    assert line.startswith(f"tdxvirt: error: grubby below host root {hostile_grubby}: "
                           f"{shell} is writable by its group or others")
    assert not marked(hostile_grubby) and snapshot(hostile_grubby) == before
