"""What a build step does, one action at a time: shown by ``plan``, run by the runner.

Each action can say what it would do (``show``) and do it (``run``) through an
executor that logs and reports progress. Commands are argument lists, never shell
strings; the only shell text is shown to people.
"""

from __future__ import annotations

import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from . import BuildFailedError


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    lines: tuple[str, ...]  # the output, when captured


class Executor(Protocol):
    """What actions need from the runner."""

    def command(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None,
                capture: bool = False) -> CommandResult: ...

    def note(self, text: str) -> None: ...


class Action(Protocol):
    def show(self) -> list[str]: ...

    def run(self, executor: Executor) -> None: ...


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)  # added to the environment

    def show(self) -> list[str]:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return [f"$ cd {shlex.quote(str(self.cwd))} && {prefix + ' ' if prefix else ''}{shlex.join(self.argv)}"]

    def run(self, executor: Executor) -> None:
        result = executor.command(list(self.argv), self.cwd, self.env or None)
        if result.returncode != 0:
            raise BuildFailedError(f"`{shlex.join(self.argv)}` exited with {result.returncode}")


@dataclass(frozen=True)
class WriteFile:
    path: Path
    text: str

    def show(self) -> list[str]:
        return [f"write {self.path}:"] + [f"    {line}" for line in self.text.splitlines()]

    def run(self, executor: Executor) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.text)
        executor.note(f"wrote {self.path}:\n{self.text}")


@dataclass(frozen=True)
class CopyFile:
    source: Path
    target: Path

    def show(self) -> list[str]:
        return [f"copy {self.source} -> {self.target}"]

    def run(self, executor: Executor) -> None:
        try:
            shutil.copyfile(self.source, self.target)
        except OSError as error:
            raise BuildFailedError(f"cannot copy {self.source} to {self.target}: {error.strerror}") from None
        executor.note(f"copied {self.source} -> {self.target}")
