"""The build pipeline end to end on a tiny QEMU: real git, real git am, real make.

The "QEMU" here is a git repository with a small ./configure and Makefile, tagged
v9.1.0-rc0; its "tdx-qemu" patch set is a real mbox from `git format-patch` kept in
a tdx-linux-like repository, as in Intel's layout. Everything runs through the real
CLI and runner: stamps, progress, logs, failure reports, install, artifacts.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from gitrepo import commit, git

from tdxvirt.build import artifacts, progress, runner, steps
from tdxvirt.build import manifest as manifests
from tdxvirt.cli import TdxvirtGroup
from tdxvirt.cli.build import build
from tdxvirt.host import HostRoot

CONFIGURE = """#!/bin/sh
# a stand-in for QEMU's configure: records its flags for the Makefile
set -e
mkdir -p build
prefix=/usr/local
fail=
slow=
for arg in "$@"; do
    case "$arg" in
        --prefix=*) prefix="${arg#--prefix=}" ;;
        --fail-build) fail=1 ;;
        --slow-build) slow=1 ;;
    esac
done
printf 'PREFIX=%s\\nFLAGS=%s\\nFAIL=%s\\nSLOW=%s\\n' "$prefix" "$*" "$fail" "$slow" > build/config.mak
echo "configured with: $*"
"""

MAKEFILE = """include build/config.mak

build/qemu-system-x86_64: version.txt build/config.mak
\t@for i in 1 2 3; do echo "CC hw/i386/file$$i.o"; done
\t@if [ -n "$(SLOW)" ]; then echo "LINK slowly"; sleep 1.5; fi
\t@if [ -n "$(FAIL)" ]; then echo "hw/i386/tdx.c:42: error: simulated compile error"; exit 1; fi
\tprintf '#!/bin/sh\\necho "QEMU emulator version %s ($(FLAGS))"\\n' "$$(cat version.txt)" > $@
\tchmod +x $@

install: build/qemu-system-x86_64
\tmkdir -p $(DESTDIR)$(PREFIX)/bin
\tcp build/qemu-system-x86_64 $(DESTDIR)$(PREFIX)/bin/qemu-system-x86_64
"""


class Sources:
    """An upstream tiny QEMU and a tdx-linux-like repository carrying its mbox."""

    def __init__(self, base: Path):
        self.qemu = base / "upstream" / "qemu"
        self.tdx = base / "upstream" / "tdx-linux"
        self.qemu.mkdir(parents=True)
        git(self.qemu, "init", "-q", "-b", "master")
        (self.qemu / "configure").write_text(CONFIGURE)
        (self.qemu / "configure").chmod(0o755)
        (self.qemu / "Makefile").write_text(MAKEFILE)
        (self.qemu / "version.txt").write_text("9.0.90\n")
        git(self.qemu, "add", ".")
        git(self.qemu, "commit", "-q", "-m", "QEMU v9.1.0-rc0")
        git(self.qemu, "tag", "v9.1.0-rc0")
        self.tdx.mkdir(parents=True)
        git(self.tdx, "init", "-q", "-b", "device-passthrough")
        self.patch_set("tdx_qemu_baseline_1a2b3c4d.mbox", ["9.0.90-tdx"])

    def patch_set(self, name: str, versions: list[str]) -> None:
        """A real mbox: one patch per version, plus an empty one git am must drop."""
        git(self.qemu, "checkout", "-q", "-B", "tdx", "v9.1.0-rc0")
        for version in versions:
            commit(self.qemu, {"version.txt": version + "\n"}, f"tdx: version {version}")
        git(self.qemu, "commit", "-q", "--allow-empty", "-m", "tdx: empty placeholder")
        commit(self.qemu, {"hw/i386/tdx.c": "/* TDX */\n"}, "tdx: add hw/i386/tdx.c")
        mbox = git(self.qemu, "format-patch", "--always", "--stdout", "v9.1.0-rc0")
        git(self.qemu, "checkout", "-q", "master")
        (self.tdx / "tdx-qemu").mkdir(exist_ok=True)
        for old in (self.tdx / "tdx-qemu").glob("*.mbox"):
            git(self.tdx, "rm", "-q", str(old.relative_to(self.tdx)))
        commit(self.tdx, {f"tdx-qemu/{name}": mbox + "\n"}, f"tdx-qemu: {name}")

    def manifest(self, path: Path, configure: list[str]) -> Path:
        path.write_text(f"""
[repos.tdx-linux]
url = "{self.tdx}"
ref = "device-passthrough"

[qemu]
url = "{self.qemu}"
ref = "v9.1.0-rc0"
patches = [{{ repo = "tdx-linux", glob = "tdx-qemu/tdx_qemu_baseline_*.mbox" }}]
configure = {json.dumps(configure)}
""")
        return path


def provide_qemu_libraries(directory: Path, monkeypatch) -> None:
    """Real pkg-config files for the libraries QEMU's configure step needs (glib, zlib, slirp):
    the prerequisites check asks pkg-config, as QEMU's meson does, and this machine
    need not have libglib2.0-dev (or libslirp-dev for --enable-slirp) for the tiny QEMU."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("glib-2.0", "zlib", "slirp"):
        (directory / f"{name}.pc").write_text(f"Name: {name}\nDescription: for the tests\nVersion: 99\n")
    monkeypatch.setenv("PKG_CONFIG_PATH", str(directory))


@pytest.fixture(autouse=True)
def qemu_libraries(tmp_path, monkeypatch):
    provide_qemu_libraries(tmp_path / "pkgconfig", monkeypatch)


@pytest.fixture
def sources(tmp_path) -> Sources:
    return Sources(tmp_path)


@pytest.fixture
def cli(state):
    group = TdxvirtGroup(name="tdxvirt", commands={"build": build})

    def invoke(*args):
        # --all: build what the test asks for whatever this machine's distribution has
        extra = ["--all"] if args and args[0] in ("plan", "run") else []
        result = CliRunner().invoke(group, ["build", *map(str, args), *extra])
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        return result

    return invoke


def library_run(manifest_file: Path, workdir: Path, state: Path, update: bool = False):
    loaded = manifests.load(manifest_file)
    ctx = steps.Context(loaded, workdir, jobs=2, install=False, host=HostRoot("/"))
    out = io.StringIO()
    summary = runner.run(steps.plan(loaded, ("qemu",), False), ctx,
                         progress.ConsoleReporter(out, live=False), artifacts.record_file(state),
                         update=update)
    return summary, out.getvalue()


def test_run_builds_records_and_then_has_nothing_to_do(sources, tmp_path, state, cli):
    manifest = sources.manifest(tmp_path / "m.toml", ["--enable-kvm", "--target-list=x86_64-softmmu"])
    workdir = tmp_path / "work"
    result = cli("run", "qemu", "--manifest", manifest, "--workdir", workdir, "-j", "2")
    assert result.exit_code == 0, result.output
    for n, label in enumerate(["tdx-linux fetch", "qemu fetch", "qemu patch", "qemu configure",
                               "qemu build"], 1):
        assert f"[{n}/5] {label}: running (log: {workdir}/logs/" in result.output
        assert f"[{n}/5] {label}: done in 00:00:0" in result.output
    binary = workdir / "src/qemu/build/qemu-system-x86_64"
    # the patched version: the mbox really went through git am, the empty patch dropped
    version = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout
    assert version.strip() == "QEMU emulator version 9.0.90-tdx (--enable-kvm --target-list=x86_64-softmmu)"
    tree = workdir / "src/qemu"
    assert git(tree, "log", "--format=%s", "refs/tdxvirt/base..HEAD").splitlines() == [
        "tdx: add hw/i386/tdx.c", "tdx: version 9.0.90-tdx"]
    assert "Skipping: tdx: empty placeholder" in (workdir / "logs/qemu.patch.log").read_text()
    assert "CC hw/i386/file3.o" in (workdir / "logs/qemu.build.log").read_text()

    record = json.loads((state / "build/artifacts.json").read_text())
    entry = record["qemu"]
    assert entry["artifacts"] == {"qemu-system-x86_64": str(binary)}
    assert entry["ref"] == "v9.1.0-rc0" and entry["url"] == str(sources.qemu)
    assert entry["revision"] == git(sources.qemu, "rev-parse", "v9.1.0-rc0")
    assert entry["patched_revision"] == git(tree, "rev-parse", "HEAD")
    assert entry["patches"] == ["tdx_qemu_baseline_1a2b3c4d.mbox"]
    found = artifacts.recorded(state)
    assert set(found) == {"qemu"} and found["qemu"].path == str(binary)
    assert found["qemu"].describe().startswith(
        f"qemu v9.1.0-rc0 ({entry['revision'][:12]}) + tdx_qemu_baseline_1a2b3c4d.mbox, built ")
    assert artifacts.build_of(str(binary), state) == found["qemu"]
    assert artifacts.build_of("/usr/bin/qemu-system-x86_64", state) is None

    # nothing changed: every step is skipped, nothing is run or rewritten
    mtime = (state / "build/artifacts.json").stat().st_mtime_ns
    summary, output = library_run(manifest, workdir, state)
    assert summary.executed == [] and len(summary.skipped) == 5
    assert "Nothing to do: all 5 steps are up to date" in output
    assert (state / "build/artifacts.json").stat().st_mtime_ns == mtime

    status = cli("status")
    assert status.exit_code == 0
    row = next(line for line in status.output.splitlines() if line.startswith("qemu"))
    assert str(binary) in row and "v9.1.0-rc0" in row and "tdx_qemu_baseline_1a2b3c4d.mbox" in row
    assert entry["revision"][:12] in row
    assert f"define uses: emulator {binary}" in status.output


def test_a_changed_input_redoes_its_step_and_every_later_one(sources, tmp_path, state):
    manifest = sources.manifest(tmp_path / "m.toml", ["--enable-kvm"])
    workdir = tmp_path / "work"
    library_run(manifest, workdir, state)

    sources.manifest(manifest, ["--enable-kvm", "--enable-slirp"])
    summary, _ = library_run(manifest, workdir, state)
    assert summary.executed == ["qemu.configure", "qemu.build"]

    # --update fetches again; with no new commit upstream nothing else is redone
    summary, _ = library_run(manifest, workdir, state, update=True)
    assert summary.executed == ["tdx-linux.fetch", "qemu.fetch"]
    assert summary.skipped == ["qemu.patch", "qemu.configure", "qemu.build"]

    # a new patch set on the tdx-linux branch: a local source is asked what its ref is
    # now, so a plain run picks it up and redoes what follows (qemu's own ref is unmoved)
    sources.patch_set("tdx_qemu_baseline_5e6f7a8b.mbox", ["9.0.90-tdx2"])
    summary, _ = library_run(manifest, workdir, state)
    assert summary.executed == ["tdx-linux.fetch", "qemu.patch", "qemu.configure", "qemu.build"]
    assert summary.skipped == ["qemu.fetch"]
    version = subprocess.run([str(workdir / "src/qemu/build/qemu-system-x86_64")],
                             capture_output=True, text=True, check=True).stdout
    assert "9.0.90-tdx2" in version
    assert artifacts.load(artifacts.record_file(state))["qemu"]["patches"] == ["tdx_qemu_baseline_5e6f7a8b.mbox"]

    # a deleted output is rebuilt even though its inputs did not change
    (workdir / "src/qemu/build/qemu-system-x86_64").unlink()
    summary, _ = library_run(manifest, workdir, state)
    assert summary.executed == ["qemu.build"]


def test_failure_names_the_log_and_its_last_lines_and_records_nothing(sources, tmp_path, state, cli):
    manifest = sources.manifest(tmp_path / "m.toml", ["--fail-build"])
    workdir = tmp_path / "work"
    result = cli("run", "qemu", "--manifest", manifest, "--workdir", workdir)
    assert result.exit_code == 1
    log = workdir / "logs/qemu.build.log"
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1
    assert error.startswith("tdxvirt: error: qemu build failed: `make -j")
    assert f"full log: {log}" in error
    # the compiler's error, not make's closing "*** [Makefile:...] Error 1"
    assert error.endswith("; first error: hw/i386/tdx.c:42: error: simulated compile error")
    # the last lines of the log are shown before the error
    assert "[5/5] qemu build: FAILED after 00:00:0" in result.stdout
    assert "    hw/i386/tdx.c:42: error: simulated compile error" in result.stdout
    assert "simulated compile error" in log.read_text()
    assert not (workdir / "stamps/qemu.build.json").exists()
    assert (workdir / "stamps/qemu.configure.json").exists()
    assert not (state / "build/artifacts.json").exists()

    sources.manifest(manifest, ["--enable-kvm"])
    summary, _ = library_run(manifest, workdir, state)
    assert summary.executed == ["qemu.configure", "qemu.build"]
    assert summary.skipped == ["tdx-linux.fetch", "qemu.fetch", "qemu.patch"]


def test_a_failure_names_the_first_error_line_of_the_failed_command(tmp_path):
    # as with make -j: the error scrolls up behind other jobs' output and make's own lines
    noisy = ('echo "a.c:20:10: fatal error: ./brotli/c/common/constants.h: No such file"; '
             'for i in $(seq 30); do echo "g++ -c other$i.cpp"; done; '
             'echo "make: *** [GNUmakefile:19: Source/C] Error 2"; exit 2')
    with runner._StepExecutor(tmp_path / "log", lambda *_: None, 0) as executor:
        assert executor.telling_line() == ""  # nothing ran: the message adds nothing
        executor.command(["sh", "-c", noisy], tmp_path)
        assert executor.telling_line() == (
            "first error: a.c:20:10: fatal error: ./brotli/c/common/constants.h: No such file")
        # error lines of a command that succeeded do not count; without one, the last line
        executor.command(["sh", "-c", 'echo "build.py: error 7000: retried, fine"'], tmp_path)
        executor.command(["sh", "-c", 'echo "still going"; echo "gave up"; exit 1'], tmp_path)
        assert executor.telling_line() == "last line: gave up"
        # edk2's build tool says "error NNNN:"
        executor.command(["sh", "-c", 'echo "build.py...\n : error 7000: Failed to execute command"; '
                                      'echo "- Failed -"; exit 1'], tmp_path)
        assert executor.telling_line() == "first error: : error 7000: Failed to execute command"
        # a check failing after a command that succeeded: that command's lines do not explain it
        executor.command(["sh", "-c", "echo '# configuration written to .config'"], tmp_path)
        assert executor.telling_line() == ""


def test_progress_shows_step_elapsed_time_and_the_log_tail(sources, tmp_path, state):
    manifest = sources.manifest(tmp_path / "m.toml", ["--slow-build"])
    loaded = manifests.load(manifest)
    ctx = steps.Context(loaded, tmp_path / "work", jobs=1, install=False, host=HostRoot("/"))
    out = io.StringIO()
    runner.run(steps.plan(loaded, ("qemu",), False), ctx,
               progress.ConsoleReporter(out, live=False, heartbeat=0), artifacts.record_file(state))
    assert "[5/5] qemu build: 00:00:01 | LINK slowly" in out.getvalue()

    live = io.StringIO()
    (tmp_path / "work/src/qemu/build/qemu-system-x86_64").unlink()
    runner.run(steps.plan(loaded, ("qemu",), False), ctx, progress.ConsoleReporter(live, live=True),
               artifacts.record_file(state))
    assert "\r\033[K[5/5] qemu build 00:00:0" in live.getvalue()
    assert "| LINK slowly" in live.getvalue()


def test_install_into_the_configured_prefix_and_prefer_it(sources, tmp_path, state, cli):
    prefix = tmp_path / "prefix"
    manifest = sources.manifest(tmp_path / "m.toml", [f"--prefix={prefix}", "--enable-kvm"])
    workdir = tmp_path / "work"
    plan = cli("plan", "qemu", "--manifest", manifest, "--workdir", workdir, "--install", "--json")
    assert [s["step"] for s in json.loads(plan.output)["steps"]][-1] == "install"
    assert json.loads(plan.output)["steps"][-1]["needs_root"] is True

    result = cli("run", "qemu", "--manifest", manifest, "--workdir", workdir, "--install")
    assert result.exit_code == 0, result.output
    installed = prefix / "bin/qemu-system-x86_64"
    assert installed.is_file()
    assert "[6/6] qemu install: done" in result.output
    entry = artifacts.load(artifacts.record_file(state))["qemu"]
    assert entry["artifacts"]["installed"] == str(installed)
    assert artifacts.recorded(state)["qemu"].path == str(installed)


def test_install_below_another_root_keeps_the_configured_paths(sources, tmp_path, state, cli):
    # the simulated host's Debian root, say: QEMU goes to <root>/usr/local, configured
    # for /usr/local (its data files, its firmware path are that system's)
    root = tmp_path / "forky"
    root.mkdir()
    manifest = sources.manifest(tmp_path / "m.toml", ["--enable-kvm"])
    workdir = tmp_path / "work"
    dry = cli("run", "--dry-run", "qemu", "--manifest", manifest, "--workdir", workdir, "--install",
              "--root", root)
    assert f"$ cd {workdir}/src/qemu && make install DESTDIR={root}" in dry.output
    assert f"qemu installed_in_root: {root}/usr/local/bin/qemu-system-x86_64" in dry.output
    assert "qemu installed:" not in dry.output
    assert not workdir.exists()

    result = cli("run", "qemu", "--manifest", manifest, "--workdir", workdir, "--install", "--root", root)
    assert result.exit_code == 0, result.output
    installed = root / "usr/local/bin/qemu-system-x86_64"
    assert installed.is_file() and "[6/6] qemu install: done" in result.output
    entry = artifacts.load(artifacts.record_file(state))["qemu"]
    assert entry["artifacts"]["installed_in_root"] == str(installed)
    assert entry["digests"]["installed_in_root"]["size"] == installed.stat().st_size
    # not this machine's emulator: define keeps naming the build tree's binary
    assert "installed" not in entry["artifacts"]
    assert artifacts.recorded(state)["qemu"].path == str(workdir / "src/qemu/build/qemu-system-x86_64")

    # installed again into / or another root: the root is part of what keys the step
    other = tmp_path / "other"
    other.mkdir()
    again = cli("run", "qemu", "--manifest", manifest, "--workdir", workdir, "--install", "--root", other)
    assert "[6/6] qemu install: done" in again.output and (other / "usr/local/bin/qemu-system-x86_64").is_file()


@pytest.mark.parametrize("args, error", [
    (["qemu", "--root", "ROOT"], "--root ROOT: only --install uses it; add --install or drop --root"),
    (["qemu", "--install", "--root", "ROOT/missing"], "--root ROOT/missing: not a folder; give the root "
                                                       "of the system to install into"),
    (["--install", "--root", "ROOT"], "--root ROOT: only QEMU installs below another root; build the kernel "
                                      "with --deb and install its packages there, or run `tdxvirt build run qemu`"),
])
def test_install_root_refusals_are_one_line(tmp_path, cli, args, error):
    root = tmp_path / "forky"
    root.mkdir()
    result = cli("plan", *[a.replace("ROOT", str(root)) for a in args], "--workdir", tmp_path / "work")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"tdxvirt: error: {error.replace('ROOT', str(root))}"]
    assert not (tmp_path / "work").exists()


def test_plan_and_dry_run_change_nothing(sources, tmp_path, state, cli):
    manifest = sources.manifest(tmp_path / "m.toml", ["--enable-kvm"])
    workdir = tmp_path / "work"
    for command in (["plan"], ["run", "--dry-run"]):
        result = cli(*command, "qemu", "--manifest", manifest, "--workdir", workdir)
        assert result.exit_code == 0, result.output
        assert "[3/5] qemu patch (to do)" in result.output
        assert f"git -C {workdir}/src/qemu -c 'user.name=tdxvirt build' -c user.email=tdxvirt@localhost " \
               f"am --empty=drop '{workdir}/src/tdx-linux/tdx-qemu/tdx_qemu_baseline_*.mbox'" in result.output
        assert f"$ cd {workdir}/src/qemu && ./configure --enable-kvm" in result.output
    assert not workdir.exists() and not state.exists()

    cli("run", "qemu", "--manifest", manifest, "--workdir", workdir)
    before = sorted((p, p.stat().st_mtime_ns) for p in workdir.rglob("*") if ".git" not in p.parts)
    dry = cli("run", "--dry-run", "qemu", "--manifest", manifest, "--workdir", workdir)
    assert "Nothing to do: every step is up to date" in dry.output
    plan = cli("plan", "qemu", "--manifest", manifest, "--workdir", workdir)
    assert plan.output.count("(up to date, skipped)") == 5
    # after the fetch the plan names the real mbox file instead of the glob
    assert f"am --empty=drop {workdir}/src/tdx-linux/tdx-qemu/tdx_qemu_baseline_1a2b3c4d.mbox" in plan.output
    after = sorted((p, p.stat().st_mtime_ns) for p in workdir.rglob("*") if ".git" not in p.parts)
    assert before == after


def test_install_without_root_is_refused_before_anything(tmp_path):
    # a real unprivileged process: the default manifest, a workdir that must not appear
    base = Path(tempfile.mkdtemp(prefix="tdxvirt-noroot-"))  # outside root's private tmp_path
    os.chmod(base, 0o777)
    workdir = base / "work"
    script = ("import sys; from tdxvirt.cli import TdxvirtGroup; from tdxvirt.cli.build import build; "
              "TdxvirtGroup(name='tdxvirt', commands={'build': build}).main(sys.argv[1:])")
    try:
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             sys.executable, "-c", script, "build", "run", "--install", "--workdir", str(workdir)],
            capture_output=True, text=True, env={**os.environ, "HOME": str(base)},
            cwd=base, check=False)
        assert not workdir.exists()
    finally:
        shutil.rmtree(base)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("tdxvirt: error: --install needs root")
    assert len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(Exception, match="needs root"):
        runner.check_root([steps.QemuInstall()], euid=1000)
    runner.check_root([steps.QemuBuild()], euid=1000)  # no install step: fine


def test_one_run_per_workdir_at_a_time(sources, tmp_path, state, cli):
    manifest = sources.manifest(tmp_path / "m.toml", [])
    workdir = tmp_path / "work"
    workdir.mkdir()
    with open(workdir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = cli("run", "qemu", "--manifest", manifest, "--workdir", workdir)
    assert result.exit_code == 1
    assert f"another `tdxvirt build run` is using {workdir}" in result.stderr
    assert not (workdir / "src/qemu").exists()


def test_status_with_nothing_built(cli, state):
    result = cli("status")
    assert result.exit_code == 0
    assert "Nothing built yet" in result.output
    assert artifacts.recorded(state) == {}
    assert json.loads(cli("status", "--json").output) == {}


def test_a_damaged_artifacts_record_is_one_line_error(cli, state):
    (state / "build").mkdir(parents=True)
    (state / "build/artifacts.json").write_text("{not json")
    result = cli("status")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"tdxvirt: error: artifacts record {state}/build/artifacts.json is unreadable")


def test_a_qemu_built_without_tdx_guest_is_named(sources, tmp_path, state, cli):
    # the tiny QEMU, like Debian 13's QEMU 10.0.13 built for real, has no tdx-guest object
    manifest = sources.manifest(tmp_path / "m.toml", ["--enable-kvm"])
    result = cli("run", "qemu", "--manifest", manifest, "--workdir", tmp_path / "work")
    assert result.exit_code == 0, result.output
    binary = tmp_path / "work/src/qemu/build/qemu-system-x86_64"
    assert f"qemu qemu-system-x86_64: {binary}" in result.stdout
    warning = result.stderr.strip()
    assert warning == (f"warning: {binary} has no tdx-guest object (-object help): it cannot run TDs; "
                       "QEMU has TDX from 10.1 (the upstream manifest's ref), older ones only with TDX patches")
    # a run with nothing to do says it again: the binary is what it is
    again = cli("run", "qemu", "--manifest", manifest, "--workdir", tmp_path / "work")
    assert "Nothing to do" in again.stdout and again.stderr.strip() == warning


def test_a_qemu_with_tdx_guest_passes_silently_and_one_that_fails_is_unknown(tmp_path, capsys):
    from tdxvirt.cli.build import _warn_without_tdx

    listing = tmp_path / "qemu-tdx"  # what QEMU >= 10.1 prints, cut short
    listing.write_text("#!/bin/sh\necho 'List of user creatable objects:'\necho '  sev-guest'\n"
                       "echo '  tdx-guest'\necho '  thread-context'\n")
    broken = tmp_path / "qemu-broken"
    broken.write_text("#!/bin/sh\necho 'error while loading shared libraries: libfdt.so.1' >&2\nexit 127\n")
    for script in (listing, broken):
        script.chmod(0o755)
    _warn_without_tdx({"qemu": {"artifacts": {"qemu-system-x86_64": str(listing)}}}, ("qemu",))
    assert capsys.readouterr().err == ""
    # only a QEMU this run was asked to build is asked
    _warn_without_tdx({"qemu": {"artifacts": {"qemu-system-x86_64": str(broken)}}}, ("ovmf",))
    assert capsys.readouterr().err == ""
    _warn_without_tdx({"qemu": {"artifacts": {"qemu-system-x86_64": str(broken)}}}, ("qemu",))
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"warning: `{broken} -object help` failed (") and "libfdt.so.1" in err
    assert err.endswith("whether this QEMU has tdx-guest is unknown") and "\n" not in err
