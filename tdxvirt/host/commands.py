"""Running host commands (grubby, update-grub, systemctl, udevadm, QEMU) as argv lists.

Everything that runs a program on the host takes a runner, so tests record the argv
lists instead of changing the machine, and ``--dry-run`` prints them. Commands are
never built as shell strings.

A host root other than ``/`` is a tree of files, not a machine tdxvirt may run
programs from: a ``chroot`` does not contain root, and whoever can write the tree
chooses what runs. ``host_runner`` (what ``host check`` and every ``--dry-run`` use)
therefore runs programs only when the host root is ``/``; below any other root it
returns a ``RefusingRunner``, which runs nothing. Running a root's own programs takes
code that asks for it by building ``SubprocessRunner(root)`` (``host setup
--run-below-root``, the simulated host's QEMU in tests), and even then, as root, only
a root-owned tree and program that no group or other user can change are run.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from ..errors import HostNotReadyError
from . import trust
from .root import HostRoot

NOT_RUN = "skipped: not run below a host root other than /"
# Where a program named without a directory is looked for below a host root, in the
# order of root's usual PATH.
SEARCH_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def tail(self, lines: int = 2) -> str:
        """The last lines of stderr (else stdout) on one line, for error messages."""
        text = (self.stderr or self.stdout).strip().splitlines()
        return " ".join(text[-lines:])


class CommandRunner(Protocol):
    def run(self, argv: Sequence[str], timeout: float = 60) -> CommandResult: ...


_MAX_INTERPRETERS = 5  # the program, then the #! interpreters Linux follows (4 levels)


def _interpreter(path: str) -> str | None:
    """The interpreter a ``#!`` line names, None for anything else."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].split()
    return words[0].decode("utf-8", "replace") if words else None


class SubprocessRunner:
    """Runs commands on this machine; given a host root other than ``/``, inside it.

    Building one with such a root is the explicit choice to run that tree's programs
    (as root: a tree and program only root can change, checked before each run). The
    program is looked up inside the root and run by that absolute path; every
    component on the way, links included (followed as the chroot will), is checked,
    so only root could make the run reach another file than the one checked.
    """

    def __init__(self, root: HostRoot | None = None):
        self.root = root or HostRoot("/")
        self.below_root = not trust.is_real_root(self.root.base)

    def resolve(self, program: str) -> tuple[str | None, str | None]:
        """(the program's path inside the root, None) or (None, why it is not run).

        A script's interpreter (``#!``, as many levels as the kernel follows) runs as
        root too, so it is held to the same rule."""
        base = str(self.root.base)
        candidates = [program] if "/" in program else [f"{d}/{program}" for d in SEARCH_DIRS]
        for candidate in candidates:
            found = trust.walk(candidate, base, check=False)
            if found.problem is None and os.path.isfile(trust.in_root(base, found.real)):
                break
        else:
            return None, f"{program}: command not found below host root {base}"
        found_as = candidate  # run by this name (a multi-call binary reads its argv[0])
        for _ in range(_MAX_INTERPRETERS):
            checked = trust.walk(candidate, base, check=trust.as_root())
            if checked.problem is not None:
                return None, trust.refusal(f"{program} below host root", base,
                                           checked.problem, "run it on that system itself")
            candidate = _interpreter(trust.in_root(base, checked.real))
            if candidate is None:
                return found_as, None
            if not candidate.startswith("/"):
                return None, (f"{program} below host root {base}: its interpreter "
                              f"{candidate!r} is not an absolute path")
        return None, f"{program} below host root {base}: too many levels of interpreters"

    def check(self, argv: Sequence[str]) -> None:
        """Raise (one line) when ``argv`` would not be run; for a plan's preflight."""
        if not self.below_root:
            return
        _, why = self.resolve(argv[0])
        if why is not None:
            raise HostNotReadyError(why)

    def wrap(self, argv: Sequence[str]) -> list[str]:
        if not self.below_root:
            return list(argv)
        path, why = self.resolve(argv[0])
        if path is None:
            raise HostNotReadyError(why)
        return ["chroot", str(self.root.base), path, *argv[1:]]

    def run(self, argv: Sequence[str], timeout: float = 60) -> CommandResult:
        try:
            full = self.wrap(argv)
        except HostNotReadyError as refused:
            return CommandResult(tuple(argv), 126, "", str(refused))
        try:
            done = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                                  errors="replace")
        except FileNotFoundError:
            return CommandResult(tuple(argv), 127, "", f"{full[0]}: command not found")
        except subprocess.TimeoutExpired:
            return CommandResult(tuple(argv), 124, "", f"timed out after {timeout:g} s")
        return CommandResult(tuple(argv), done.returncode, done.stdout, done.stderr)


@dataclass
class RefusingRunner:
    """Runs nothing: what runs below a host root other than ``/`` unless asked for.

    Every command answers ``NOT_RUN`` (exit 126); ``refuses`` tells callers to report
    a check or step as skipped rather than failed. ``calls`` records what was refused.
    """

    root: HostRoot | None = None
    calls: list[list[str]] = field(default_factory=list)
    refuses: bool = True

    def run(self, argv: Sequence[str], timeout: float = 60) -> CommandResult:
        self.calls.append(list(argv))
        return CommandResult(tuple(argv), 126, "", NOT_RUN)


def host_runner(root: HostRoot) -> CommandRunner:
    """What may run for a host root by default: this machine's programs for ``/``,
    nothing below any other root, unless that root is a whole host saying how its
    programs run (HostRoot.runner: the simulated host)."""
    if (own := root.runner()) is not None:
        return own
    if trust.is_real_root(root.base):
        return SubprocessRunner()
    return RefusingRunner(root)


def refuses(runner: CommandRunner) -> bool:
    return bool(getattr(runner, "refuses", False))


@dataclass
class RecordingRunner:
    """A stand-in that records argv lists and answers from ``replies`` (for tests).

    ``replies`` maps an argv prefix (a tuple) to a CommandResult-like triple
    ``(returncode, stdout, stderr)``; anything else succeeds with no output.
    """

    replies: dict[tuple[str, ...], tuple[int, str, str]] = field(default_factory=dict)
    calls: list[list[str]] = field(default_factory=list)

    def run(self, argv: Sequence[str], timeout: float = 60) -> CommandResult:
        self.calls.append(list(argv))
        best: tuple[str, ...] | None = None
        for prefix in self.replies:
            if tuple(argv[: len(prefix)]) == prefix and (best is None or len(prefix) > len(best)):
                best = prefix
        code, out, err = self.replies[best] if best is not None else (0, "", "")
        return CommandResult(tuple(argv), code, out, err)
