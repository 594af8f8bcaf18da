"""Running a plan: skip what is done, run the rest with progress and a log per step.

A step is done when its stamp holds the key of its current inputs and what it made
is still there. Once a step of a component runs with new inputs or comes to a new
outcome, every later step of that component runs too. Each step writes
``<workdir>/logs/<component>.<step>.log`` and reports its progress (step n of m,
elapsed time, the last line of output) to a reporter (see ``progress``); a failure
names the log, its last lines and the failed command's first error line. After each
component, its artifacts are recorded.
"""

from __future__ import annotations

import collections
import fcntl
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, TdxvirtError
from . import COMPONENTS, BuildFailedError, prereqs
from . import artifacts as artifacts_record
from .actions import CommandResult
from .stamps import step_key
from .steps import Context, KernelConfigure, NotYetKnown, Step, artifact_entry

TAIL_LINES = 15
# a compiler's or a build tool's error line ("x.c:20:10: fatal error: ...", edk2's
# "build.py...: error 7000: ..."), not make's closing "*** [...] Error 2": with -j the
# first one scrolls far above the last lines, which then say only what make gave up on
_ERROR_LINE = re.compile(r"\berror( [0-9A-Fa-f]{1,4})?:", re.IGNORECASE)


@dataclass
class StepState:
    number: int
    step: Step
    done: bool
    key: str | None


@dataclass
class RunSummary:
    executed: list[str] = field(default_factory=list)  # step ids, in order
    skipped: list[str] = field(default_factory=list)
    recorded: list[str] = field(default_factory=list)  # components whose record changed


def _inputs(step: Step, ctx: Context) -> dict | None:
    try:
        return step.inputs(ctx)
    except NotYetKnown:
        return None


def _current(step: Step, ctx: Context, key: str | None) -> bool:
    """The step's stamp holds this key and what it made is still there."""
    stamp = ctx.stamps.load(step.id)
    return key is not None and stamp is not None and stamp.key == key and step.valid(ctx, stamp)


def states(steps: list[Step], ctx: Context, update: bool = False) -> list[StepState]:
    """Which steps a run would skip, worked out without changing anything."""
    previous: dict[str, str | None] = {}
    redo: set[str] = set()
    found = []
    for number, step in enumerate(steps, 1):
        inputs = None if step.component in redo else _inputs(step, ctx)
        key = None if inputs is None else step_key(step.id, inputs, previous.get(step.component))
        current = _current(step, ctx, key)
        if not current:
            redo.add(step.component)
        refetch = update and step.name == "fetch"  # what it brings is known only then
        previous[step.component] = key
        found.append(StepState(number, step, current and not refetch, key))
    return found


def todo_steps(steps: list[Step], ctx: Context, update: bool = False) -> list[Step]:
    """The steps a run would run (all of them when git is not there to tell)."""
    try:
        return [state.step for state in states(steps, ctx, update) if not state.done]
    except BuildFailedError:  # git missing: every step counts, and git is named missing
        return list(steps)


def missing_prerequisites(todo: list[Step], ctx: Context) -> prereqs.Missing:
    """What ``todo`` needs that this machine lacks (QEMU's flags and the kernel's base
    config add needs of their own)."""
    flags = ctx.manifest.qemu.configure if ctx.manifest.qemu else ()
    base = KernelConfigure().base_file(ctx) if ctx.manifest.kernel else None
    return prereqs.missing(todo, ctx.toolbox, flags, base)


def check_prerequisites(steps: list[Step], ctx: Context, update: bool = False) -> None:
    """Refuse in one line, before anything runs, when a step's tools are not installed."""
    found = missing_prerequisites(todo_steps(steps, ctx, update), ctx)
    if found.by_component:
        raise prereqs.PrerequisitesMissingError(found.describe() + "; nothing was run")


def check_root(steps: list[Step], euid: int | None = None) -> None:
    if any(step.needs_root for step in steps):
        require_root(euid)


def require_root(euid: int | None = None) -> None:
    if (os.geteuid() if euid is None else euid) != 0:
        raise InputError("--install needs root (make modules_install, make install write to "
                         "/lib/modules, /boot and the QEMU prefix); run it with sudo, or drop --install")


class _Lock:
    """One build at a time per work directory."""

    def __init__(self, workdir: Path):
        self.path = workdir / ".lock"

    def __enter__(self):
        self.file = open(self.path, "w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise TdxvirtError(f"another `tdxvirt build run` is using {self.path.parent}; "
                               "wait for it to finish") from None
        return self

    def __exit__(self, *exc):
        self.file.close()


def run(steps: list[Step], ctx: Context, reporter, record_file: Path,
        euid: int | None = None, update: bool = False) -> RunSummary:
    """Run what is not done; ``update`` fetches again (new commits on a branch ref)."""
    check_root(steps, euid)
    check_prerequisites(steps, ctx, update)
    summary = RunSummary()
    last_of = {step.component: number for number, step in enumerate(steps, 1)}
    for directory in (ctx.workdir / "src", ctx.logs):
        directory.mkdir(parents=True, exist_ok=True)
    with _Lock(ctx.workdir):
        previous: dict[str, str] = {}
        redo: set[str] = set()  # components whose remaining steps must all run
        # components whose build or install ran: only then are their artifacts new (a
        # refetch finding nothing new must not record a file replaced meanwhile as built)
        ran: set[str] = set()
        for number, step in enumerate(steps, 1):
            try:
                inputs = step.inputs(ctx)
            except NotYetKnown as missing:  # an earlier step should have made it
                raise BuildFailedError(f"{step.label}: {missing}; run the whole plan "
                                       f"(`tdxvirt build run {step.component}`)") from None
            except BuildFailedError as error:
                raise BuildFailedError(f"{step.label}: {error}") from error
            key = step_key(step.id, inputs, previous.get(step.component))
            refetch = update and step.name == "fetch"
            if step.component not in redo and not refetch and _current(step, ctx, key):
                reporter.step_skipped(number, len(steps), step)
                summary.skipped.append(step.id)
            else:
                old = ctx.stamps.load(step.id)
                ctx.stamps.clear(step.id)  # an interrupted step must not look done
                _execute(step, ctx, number, len(steps), reporter)
                results = step.results(ctx)
                ctx.stamps.record(step.id, key, inputs, results)
                summary.executed.append(step.id)
                if step.name in ("build", "install"):
                    ran.add(step.component)
                # a step that ran again with the same inputs and the same outcome (a
                # refetch finding no new commit, a deleted output rebuilt) leaves the
                # later steps to their own stamps; anything else redoes them all
                if old is None or old.key != key or old.results != results:
                    redo.add(step.component)
            previous[step.component] = key
            if last_of[step.component] == number and step.component in COMPONENTS:
                previous_entry = artifacts_record.load(record_file).get(step.component)
                entry = artifact_entry(ctx, step.component, previous_entry, rebuilt=step.component in ran)
                if artifacts_record.update(record_file, step.component, entry):
                    summary.recorded.append(step.component)
    reporter.finished(summary)
    return summary


def _execute(step: Step, ctx: Context, number: int, total: int, reporter) -> None:
    log_path = ctx.logs / f"{step.id}.log"
    started = time.monotonic()
    reporter.step_started(number, total, step, log_path)
    with _StepExecutor(log_path, lambda elapsed, line: reporter.step_progress(
            number, total, step, elapsed, line), started) as executor:
        try:
            for action in step.actions(ctx):
                action.run(executor)
        except (BuildFailedError, OSError) as error:
            if isinstance(error, OSError):  # e.g. a file the step writes cannot be written
                error = BuildFailedError(f"{error.filename or ''}: {error.strerror or error}")
            executor.note(f"FAILED: {error}")
            reporter.step_failed(number, total, step, time.monotonic() - started, log_path,
                                 list(executor.tail))
            telling = executor.telling_line()
            raise BuildFailedError(f"{step.label} failed: {error}; full log: {log_path}"
                                   f"{'; ' + telling if telling else ''}") from error
    reporter.step_finished(number, total, step, time.monotonic() - started)


class _StepExecutor:
    """Runs one step's commands, everything they print going to the step's log."""

    def __init__(self, log_path: Path, on_progress, started: float):
        self.log_path = log_path
        self.on_progress = on_progress
        self.started = started
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)  # the log's
        self.output_tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)  # commands'
        self.first_error: str | None = None  # of the last command run

    def __enter__(self):
        self.log = open(self.log_path, "wb")
        return self

    def __exit__(self, *exc):
        self.log.close()

    def _write(self, text: str) -> None:
        for line in text.splitlines():
            self.tail.append(line)
        self.log.write(text.encode() + (b"" if text.endswith("\n") else b"\n"))
        self.log.flush()

    def note(self, text: str) -> None:
        self._write(text)

    def telling_line(self) -> str:
        """For the failure message: the failed command's first error line, else its last
        line; empty when no command printed anything (a check that failed on its own)."""
        if self.first_error is not None:
            return f"first error: {self.first_error.strip()[:200]}"
        last = next((line for line in reversed(self.output_tail) if line.strip()), "")
        return f"last line: {last.strip()[:200]}" if last else ""

    def command(self, argv, cwd, env=None, capture=False) -> CommandResult:
        self._write(f"$ cd {shlex.quote(str(cwd))} && {shlex.join(argv)}")
        self.first_error = None
        if not Path(cwd).is_dir():
            raise BuildFailedError(f"folder {cwd} does not exist (an earlier step did not make it)")
        try:
            process = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **(env or {})},
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        except FileNotFoundError:
            raise BuildFailedError(f"`{argv[0]}` is not installed or not executable; install it "
                                   "(see the build packages in the README)") from None
        except PermissionError:
            raise BuildFailedError(f"`{argv[0]}` is not executable") from None
        captured: list[str] = []
        reader = threading.Thread(target=self._read, args=(process.stdout, captured, capture), daemon=True)
        reader.start()
        try:
            while True:
                try:
                    process.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    self.on_progress(time.monotonic() - self.started, self.tail[-1] if self.tail else "")
        except BaseException:  # Ctrl-C: stop the whole command, not only its first process
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            reader.join()
            self._write("interrupted")
            raise
        reader.join()
        if process.returncode == 0:  # what it printed does not explain a later failure
            self.first_error = None
            self.output_tail.clear()
        self._write(f"(exit status {process.returncode})")
        return CommandResult(process.returncode, tuple(captured))

    def _read(self, stream, captured: list[str], capture: bool) -> None:
        for raw in stream:
            self.log.write(raw)
            self.log.flush()
            text = raw.decode(errors="replace").rstrip("\r\n").split("\r")[-1]
            self.tail.append(text)
            self.output_tail.append(text)
            if self.first_error is None and _ERROR_LINE.search(text):
                self.first_error = text
            if capture:
                captured.append(text)
        stream.close()
