"""Running host commands (grubby, update-grub, systemctl, udevadm, QEMU) as argv lists.

Everything that runs a program on the host takes a runner, so tests record the argv
lists instead of changing the machine, and ``--dry-run`` prints them. Commands are
never built as shell strings.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from .root import HostRoot


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


class SubprocessRunner:
    """Runs commands on the host; below a host root other than ``/``, inside it (chroot).

    A host root other than ``/`` is a whole system tree (an image being prepared, the
    simulated host's forky root): its grubby or QEMU are the ones to run, not ours.
    """

    def __init__(self, root: HostRoot | None = None):
        self.root = root or HostRoot("/")

    def wrap(self, argv: Sequence[str]) -> list[str]:
        if str(self.root.base) in ("/", ""):
            return list(argv)
        return ["chroot", str(self.root.base), *argv]

    def run(self, argv: Sequence[str], timeout: float = 60) -> CommandResult:
        full = self.wrap(argv)
        try:
            done = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                                  errors="replace")
        except FileNotFoundError:
            return CommandResult(tuple(argv), 127, "", f"{full[0]}: command not found")
        except subprocess.TimeoutExpired:
            return CommandResult(tuple(argv), 124, "", f"timed out after {timeout:g} s")
        return CommandResult(tuple(argv), done.returncode, done.stdout, done.stderr)


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
