"""What a root-run tdxvirt may trust: paths only root can change.

tdxvirt runs as root (``sudo``), and some of what it runs, reads or writes is named by
the environment (``$TDXVIRT_GPU_TOOLS``, ``$TDXVIRT_CONFIG``, ``$TDXVIRT_STATE_DIR``,
``$TDXVIRT_SCHEMA_DIR``, a user's ``~/.config`` kept by ``sudo -E``) or lies below a
host root other than ``/``. As root it accepts such a path only when every component
on the way to it is owned by root and cannot be changed by anyone else: no group or
other write permission, except on an ancestor directory with the sticky bit (``/tmp``),
where others cannot replace root's entries. Symlinks on the way are followed, and
must be root's too. As any other user nothing changes: that user can only hurt
themself.

``walk`` checks a path below any base directory (a host root), resolving links as a
``chroot`` into it would: an absolute link target starts again at the base, ``..``
stops at the base.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, TdxvirtError

MAX_LINKS = 40


def as_root() -> bool:
    return os.geteuid() == 0


@dataclass(frozen=True)
class Problem:
    """The first component on the way to a path that someone other than root controls."""

    path: str  # the component, as a path on this machine
    owner: int | None = None  # set when it is not owned by root
    writable: bool = False  # group/other-writable
    other: str | None = None  # anything else (missing, a loop of links, not a directory)

    def describe(self) -> str:
        if self.other:
            return f"{self.path} {self.other}"
        faults = []
        if self.owner is not None:
            faults.append(f"is owned by uid {self.owner}, not root")
        if self.writable:
            faults.append("is writable by its group or others")
        return f"{self.path} " + " and ".join(faults)

    def fix(self) -> str:
        if self.other:
            return ""
        steps = []
        if self.owner is not None:
            steps.append(f"chown root {self.path}")
        if self.writable:
            steps.append(f"chmod go-w {self.path}")
        return " && ".join(steps)


@dataclass(frozen=True)
class Walk:
    real: str  # the path inside the base, links resolved ("/" + components)
    problem: Problem | None
    exists: bool = True


def _judge(st: os.stat_result, shown: str, final: bool, sticky_ok: bool) -> Problem | None:
    owner = st.st_uid if st.st_uid != 0 else None
    writable = False
    if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o022:
        writable = not (sticky_ok and not final and stat.S_ISDIR(st.st_mode)
                        and st.st_mode & stat.S_ISVTX)
    if owner is None and not writable:
        return None
    return Problem(shown, owner, writable)


def absolute(path: str | os.PathLike) -> str:
    """``path`` made absolute without normalizing it: ``link/..`` must be resolved
    through the link, as the kernel will when the path is opened, not cut away."""
    text = os.fspath(path)
    return text if text.startswith("/") else os.path.join(os.getcwd(), text)


def _shown(base: str, components: list[str]) -> str:
    return os.path.join(base, *components) if components else base


def walk(path: str | os.PathLike, base: str | os.PathLike = "/", *, check: bool = True,
         sticky_ok: bool = True, missing_ok: bool = False,
         check_base: bool = True) -> Walk:
    """Follow ``path`` below ``base`` component by component, judging each one.

    Every directory on the way (and ``base`` itself, unless ``check_base`` is false)
    must be root's and not group/other-writable (a sticky one may be, when
    ``sticky_ok``); every link must be root's; the last component must be root's and
    not group/other-writable. A component that does not exist ends the walk: with
    ``missing_ok`` the deepest existing directory must then not be writable by others
    at all (sticky or not: someone else could create the rest first), else it is a
    problem.
    """
    base = absolute(base)
    pending = [p for p in os.fspath(path).split("/") if p not in ("", ".")]
    inside: list[str] = []
    links = 0
    if check and check_base:
        # The base's own ancestors: a directory someone else can rename is no base.
        if base.strip("/"):
            ancestry = walk(base, "/", check=True, sticky_ok=sticky_ok, check_base=True)
            if ancestry.problem:
                return Walk("/", ancestry.problem)
        else:
            problem = _judge(os.lstat("/"), "/", not pending, sticky_ok)
            if problem:
                return Walk("/", problem)
    while pending:
        part = pending.pop(0)
        if part == "..":
            if inside:
                inside.pop()
            continue
        shown = _shown(base, inside + [part])
        try:
            st = os.lstat(shown)
        except FileNotFoundError:
            real = "/" + "/".join(inside + [part] + pending)
            if not missing_ok:
                return Walk(real, Problem(shown, other="does not exist"), exists=False)
            if check:
                parent = _shown(base, inside)
                pst = os.lstat(parent)
                problem = _judge(pst, parent, True, False)
                if problem:
                    return Walk(real, problem, exists=False)
            return Walk(real, None, exists=False)
        except NotADirectoryError:
            return Walk("/" + "/".join(inside), Problem(_shown(base, inside),
                                                        other="is not a directory"))
        except OSError as error:
            return Walk("/" + "/".join(inside + [part]),
                        Problem(shown, other=f"cannot be read ({error.strerror})"))
        if stat.S_ISLNK(st.st_mode):
            if check and st.st_uid != 0:
                return Walk("/" + "/".join(inside + [part]), Problem(shown, st.st_uid))
            links += 1
            if links > MAX_LINKS:
                return Walk("/" + "/".join(inside + [part]),
                            Problem(shown, other="leads through too many symlinks"))
            target = os.readlink(shown)
            if target.startswith("/"):
                inside = []
            pending = [p for p in target.split("/") if p not in ("", ".")] + pending
            continue
        if check:
            problem = _judge(st, shown, not pending, sticky_ok)
            if problem:
                return Walk("/" + "/".join(inside + [part]), problem)
        if pending and not stat.S_ISDIR(st.st_mode):
            return Walk("/" + "/".join(inside + [part]),
                        Problem(shown, other="is not a directory"))
        inside.append(part)
    return Walk("/" + "/".join(inside), None)


def trust_problem(path: str | os.PathLike, *, strict_parent: bool = False,
                  missing_ok: bool = False) -> Problem | None:
    """Why root should not trust ``path`` (None: it may); always None when not root.

    ``strict_parent``: the directory holding the path must not be writable by others
    even with the sticky bit (a Python script's directory is on its import path).
    """
    if not as_root():
        return None
    result = walk(absolute(path), "/", missing_ok=missing_ok)
    if result.problem or not strict_parent or not result.exists:
        return result.problem
    parent = os.path.dirname(result.real)
    st = os.lstat(parent)
    if st.st_mode & 0o022:
        return Problem(parent, None, True)
    return None


def tree_problem(directory: str | os.PathLike, limit: int = 10_000) -> Problem | None:
    """As root: the first entry below ``directory`` (links not followed) that is not
    root's or is group/other-writable; for a script's directory, whose every module
    it may import. None when not root."""
    if not as_root():
        return None
    seen = 0
    for top, dirs, names in os.walk(os.fspath(directory)):
        for name in dirs + names:
            seen += 1
            if seen > limit:
                return Problem(os.fspath(directory), other=f"holds more than {limit} files "
                               "to check; give a directory with the tool alone")
            path = os.path.join(top, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            problem = _judge(st, path, True, False)
            if problem:
                return problem
    return None


def refusal(what: str, path: str | os.PathLike, problem: Problem, otherwise: str = "") -> str:
    """One line: what was refused, why, and how to fix it."""
    fix = problem.fix()
    text = (f"{what} {os.fspath(path)}: {problem.describe()}; tdxvirt runs as root and "
            "uses only paths that root owns and no group or other user can change")
    if fix:
        text += f": `{fix}`"
    if otherwise:
        text += f", or {otherwise}"
    return text


def require_trusted(path: str | os.PathLike, what: str, *, otherwise: str = "",
                    strict_parent: bool = False, missing_ok: bool = False,
                    error: type[TdxvirtError] = InputError) -> None:
    """Raise (one line) when running as root and ``path`` is not root's alone."""
    problem = trust_problem(path, strict_parent=strict_parent, missing_ok=missing_ok)
    if problem is not None:
        raise error(refusal(what, path, problem, otherwise))


def is_real_root(base: str | os.PathLike) -> bool:
    """Whether a host root is this machine's own ``/`` (so its programs are ours)."""
    try:
        return os.path.realpath(os.fspath(base) or "/") == "/"
    except OSError:
        return False


def in_root(base: Path | str, path: str) -> str:
    """A path inside ``base`` as seen on this machine."""
    return os.path.join(os.fspath(base), path.lstrip("/"))
