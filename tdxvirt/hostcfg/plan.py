"""Host changes as a list of steps: files to write, commands to run, things to tell.

Planning functions (``setup.plan_setup``, ``setup.plan_revert``) are pure: they take
the files' current bytes and the host's facts and return a HostPlan. The same plan is
printed by ``--dry-run`` (unified diffs and argv lists) and carried out by
``apply.apply_plan``, so what is shown is what is done.
"""

from __future__ import annotations

import difflib
import shlex
from dataclasses import dataclass


@dataclass(frozen=True)
class WriteFile:
    path: str  # absolute host path
    old: bytes | None  # the bytes planned against; None: the file does not exist
    new: bytes | None  # None: remove the file (reverting one tdxvirt created)
    why: str
    mode: int = 0o644  # for a file that does not exist yet
    dir_mode: int | None = None  # create its missing directories with this mode


@dataclass(frozen=True)
class RunCommand:
    argv: tuple[str, ...]
    why: str
    undo: tuple[str, ...] | None = None  # what ``--revert`` runs to take it back


@dataclass(frozen=True)
class Notice:
    text: str
    kind: str = "info"  # info, warning, cannot (a step tdxvirt cannot do), reboot


Step = WriteFile | RunCommand | Notice


@dataclass(frozen=True)
class HostPlan:
    steps: tuple[Step, ...]

    @property
    def changes(self) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if not isinstance(s, Notice))

    @property
    def notices(self) -> tuple[Notice, ...]:
        return tuple(s for s in self.steps if isinstance(s, Notice))

    def files(self) -> tuple[WriteFile, ...]:
        return tuple(s for s in self.steps if isinstance(s, WriteFile))

    def commands(self) -> tuple[RunCommand, ...]:
        return tuple(s for s in self.steps if isinstance(s, RunCommand))


def _lines(data: bytes | None) -> list[str]:
    if data is None:
        return []
    lines = data.decode("utf-8", "replace").splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n\\ No newline at end of file\n"
    return lines


def unified_diff(step: WriteFile) -> str:
    before = f"a{step.path}" if step.old is not None else "/dev/null"
    after = f"b{step.path}" if step.new is not None else "/dev/null"
    return "".join(difflib.unified_diff(_lines(step.old), _lines(step.new), before, after))


def describe(step: Step) -> str:
    """One line saying what a step does."""
    if isinstance(step, WriteFile):
        verb = "create" if step.old is None else "remove" if step.new is None else "edit"
        return f"{verb} {step.path}: {step.why}"
    if isinstance(step, RunCommand):
        return f"run `{shlex.join(step.argv)}`: {step.why}"
    prefix = {"warning": "warning: ", "cannot": "cannot: ", "reboot": "reboot needed: "}
    return prefix.get(step.kind, "") + step.text


def render_step(step: Step) -> str:
    """A step as it is shown before it is done (and by ``--dry-run``): a file's diff too."""
    text = describe(step) + "\n"
    if isinstance(step, WriteFile):
        text += unified_diff(step)
    return text


def render(plan: HostPlan) -> str:
    """The whole plan as ``--dry-run`` prints it."""
    return "".join(render_step(step) for step in plan.steps)
