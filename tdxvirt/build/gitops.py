"""git for the build: fetch a ref into a tree, apply mbox patch sets with ``git am``.

A tree is fetched with ``git fetch origin REF`` and checked out detached, which works
the same for a branch, a tag or a commit, from a URL or a local path; the fetched
commit is kept as ``refs/tdxvirt/base`` so patching always starts from it again.
The manifest's mirrors go on tdxvirt's own git command lines as ``-c
url.<mirror>.insteadOf=<prefix>`` (submodules included), never into any git config.
A patch that does not apply is aborted with ``git am --abort`` and reported with the
mbox, the patch and the files it could not change.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import BuildFailedError
from .actions import Command, Executor
from .manifest import Mirror, Repo

BASE_REF = "refs/tdxvirt/base"
# git am needs a committer; never touch the user's git configuration for it
IDENTITY = ("-c", "user.name=tdxvirt build", "-c", "user.email=tdxvirt@localhost")
GIT_ENV = {"GIT_TERMINAL_PROMPT": "0"}  # fail, never wait for a password prompt

_FAILED_AT = re.compile(r"Patch failed at (\d+) (.*)")
_FILE_PATTERNS = (
    re.compile(r"error: patch failed: (.+):\d+$"),
    re.compile(r"error: (.+): patch does not apply$"),
    re.compile(r"error: (.+): does not exist in index$"),
    re.compile(r"error: (.+): already exists in (?:index|working directory)$"),
)


def mirror_config(mirrors: tuple[Mirror, ...] = (), local_source: bool = False) -> tuple[str, ...]:
    """``-c`` options for tdxvirt's own git command lines (never the user's configuration):
    each mirror as ``url.<mirror>.insteadOf=<prefix>`` (git passes them on to the
    submodule clones it starts), and ``protocol.file.allow=always`` when anything comes
    from a local path (git refuses local submodule clones without it since 2.38.1)."""
    options: list[str] = []
    for mirror in mirrors:
        options += ["-c", f"url.{mirror.base}.insteadOf={mirror.prefix}"]
    if local_source or any(mirror.local for mirror in mirrors):
        options += ["-c", "protocol.file.allow=always"]
    return tuple(options)


def mirrored_url(url: str, mirrors: tuple[Mirror, ...] = ()) -> str:
    """Where git fetches ``url`` from with these mirrors (the longest prefix wins, as in git)."""
    matches = [mirror for mirror in mirrors if url.startswith(mirror.prefix)]
    if not matches:
        return url
    best = max(matches, key=lambda mirror: len(mirror.prefix))
    return best.base + url[len(best.prefix):]


def fetch_commands(repo: Repo, tree: Path, mirrors: tuple[Mirror, ...] = ()) -> list[Command]:
    commands = []
    git = ("git", "-C", str(tree))
    config = mirror_config(mirrors, local_source(mirrored_url(repo.url, mirrors)) is not None)
    if not (tree / ".git").exists():
        commands += [Command(("git", "init", "--quiet", str(tree)), tree.parent, GIT_ENV),
                     Command(git + ("remote", "add", "origin", repo.url), tree.parent, GIT_ENV)]
    else:
        commands.append(Command(git + ("remote", "set-url", "origin", repo.url), tree.parent, GIT_ENV))
    depth = (f"--depth={repo.depth}",) if repo.depth else ()
    commands += [
        Command(git + config + ("fetch", *depth, "origin", repo.ref), tree.parent, GIT_ENV),
        CheckoutFetched(tree, repo.submodules, config),
    ]
    return commands


@dataclass(frozen=True)
class CheckoutFetched:
    """Check out what was fetched, unless the tree is already based on it.

    A refetch that finds the same commit keeps the tree (and its patches and build)
    as they are; a new commit replaces the tree's content by it.
    """

    tree: Path
    submodules: bool | tuple[str, ...]  # a tuple: only these paths
    config: tuple[str, ...] = ()  # mirror_config(): the mirrors reach the submodules too

    def checkout(self) -> list[Command]:
        git = ("git", "-C", str(self.tree))
        return [
            Command(git + ("-c", "advice.detachedHead=false", "checkout", "--quiet", "--force",
                           "--detach", "FETCH_HEAD"), self.tree.parent, GIT_ENV),
            Command(git + ("update-ref", BASE_REF, "HEAD"), self.tree.parent, GIT_ENV),
        ]

    def submodule_update(self) -> list[Command]:
        # run even when the checkout is skipped: a failed earlier fetch may have
        # stopped between the checkout and the submodules
        if not self.submodules:
            return []
        paths = ("--", *self.submodules) if isinstance(self.submodules, tuple) else ()
        return [Command(("git", "-C", str(self.tree), *self.config, "submodule", "update", "--init", *paths),
                        self.tree.parent, GIT_ENV)]

    def show(self) -> list[str]:
        checkout = [line for command in self.checkout() for line in command.show()]
        note = [f"  (these two are skipped when FETCH_HEAD is already {BASE_REF}: the tree is kept)"]
        return checkout + note + [line for command in self.submodule_update() for line in command.show()]

    def run(self, executor: Executor) -> None:
        fetched = revision(self.tree, "FETCH_HEAD")
        if fetched is not None and fetched == revision(self.tree, BASE_REF):
            executor.note(f"fetched {fetched}, the commit the tree is based on: kept as it is")
        else:
            for command in self.checkout():
                command.run(executor)
        for command in self.submodule_update():
            command.run(executor)


def reset_to_base(tree: Path) -> Command:
    return Command(("git", "-C", str(tree), "-c", "advice.detachedHead=false", "checkout",
                    "--quiet", "--force", "--detach", BASE_REF), tree.parent, GIT_ENV)


def revision(tree: Path, ref: str = "HEAD", kind: str = "commit") -> str | None:
    """The commit (or other ``kind``) ``ref`` names in ``tree`` (None when there is none)."""
    try:
        result = subprocess.run(["git", "-C", str(tree), "rev-parse", "--verify", "--quiet", f"{ref}^{{{kind}}}"],
                                capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise BuildFailedError("git is not installed; install it (Debian: git)") from None
    return result.stdout.strip() or None


def revision_tree(tree: Path, ref: str = "HEAD") -> str | None:
    """The git tree id of ``ref``: a digest of exactly the files it holds."""
    return revision(tree, ref, kind="tree")


def local_source(url: str) -> Path | None:
    """The folder of a repository given as a local path or file:// URL, else None."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    elif "://" in url or not url.startswith("/"):
        return None
    return Path(url)


def source_revision(url: str, ref: str, mirrors: tuple[Mirror, ...] = ()) -> str | None:
    """The commit ``ref`` names in a local source repository now (None for a remote URL,
    or when the repository cannot say).

    Reading it costs no network, so a local source (a mirror, build-smoke's tree) is
    checked on every run: a tag moved or a branch advanced there refetches without
    ``--update``. ``rev-parse`` resolves a name the way ``git fetch`` does (refs/NAME,
    refs/tags/NAME, refs/heads/NAME, ...).
    """
    folder = local_source(mirrored_url(url, mirrors))  # a remote URL served by a local mirror counts
    if folder is None:
        return None
    # safe.directory on the command line only: a mirror owned by another user is read,
    # the user's git configuration is left alone
    try:
        result = subprocess.run(["git", "-c", f"safe.directory={folder}", "-C", str(folder), "rev-parse",
                                 "--verify", "--quiet", "--end-of-options", ref + "^{commit}"],
                                capture_output=True, text=True, check=False, env={**os.environ, **GIT_ENV})
    except FileNotFoundError:
        return None  # no git: the prerequisites check names it
    return result.stdout.strip() or None


def count_commits(tree: Path, since: str, until: str = "HEAD") -> int:
    result = subprocess.run(["git", "-C", str(tree), "rev-list", "--count", f"{since}..{until}"],
                            capture_output=True, text=True, check=False)
    return int(result.stdout.strip() or 0)


@dataclass(frozen=True)
class PatchConflict:
    mbox: Path
    patch: str  # "0003 x86/tdx: subject"
    files: tuple[str, ...]


def parse_am_failure(mbox: Path, lines: list[str] | tuple[str, ...]) -> PatchConflict:
    patch, files = "?", []
    for line in lines:
        line = line.rstrip()
        if match := _FAILED_AT.search(line):
            patch = f"{match.group(1)} {match.group(2)}"
        for pattern in _FILE_PATTERNS:
            if (match := pattern.search(line)) and match.group(1) not in files:
                files.append(match.group(1))
    return PatchConflict(mbox=mbox, patch=patch, files=tuple(files))


class PatchConflictError(BuildFailedError):
    def __init__(self, message: str, conflict: PatchConflict):
        super().__init__(message)
        self.conflict = conflict


@dataclass(frozen=True)
class ApplyMbox:
    """``git am --empty=drop MBOX``; on failure ``git am --abort`` and name the patch."""

    tree: Path
    mbox: Path

    @property
    def argv(self) -> tuple[str, ...]:
        return ("git", "-C", str(self.tree), *IDENTITY, "am", "--empty=drop", str(self.mbox))

    def show(self) -> list[str]:
        return Command(self.argv, self.tree.parent).show()

    def run(self, executor: Executor) -> None:
        if (self.tree / ".git" / "rebase-apply").exists():
            executor.command(["git", "-C", str(self.tree), "am", "--abort"], self.tree.parent, GIT_ENV)
        # C locale: the messages parsed below are git's English ones
        result = executor.command(list(self.argv), self.tree.parent, {**GIT_ENV, "LC_ALL": "C"},
                                  capture=True)
        if result.returncode == 0:
            return
        conflict = parse_am_failure(self.mbox, result.lines)
        if not (self.tree / ".git" / "rebase-apply").exists():
            # git am stopped before applying anything (an mbox it cannot read)
            reason = next((line for line in reversed(result.lines) if line.strip()), "no output")
            raise PatchConflictError(f"git am cannot apply {self.mbox}: {reason.strip()}; "
                                     "nothing of it was applied", conflict)
        aborted = executor.command(["git", "-C", str(self.tree), "am", "--abort"], self.tree.parent, GIT_ENV)
        state = ("git am aborted: the tree is back where it was before this mbox" if aborted.returncode == 0
                 else f"`git am --abort` failed too: clean {self.tree} by hand")
        files = ", ".join(conflict.files) or "see the log"
        raise PatchConflictError(
            f"patch {conflict.patch} of {self.mbox.name} does not apply to {self.tree.name} "
            f"(files: {files}); {state}", conflict)
