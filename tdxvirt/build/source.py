"""``--source PATH``: build a component from a local source tree instead of fetching it.

The source is one of: a git checkout (its tracked files, submodules included, as they
are in the working tree), a release tarball (``qemu-10.2.0.tar.xz`` ships QEMU's meson
subprojects, so it builds offline), or an unpacked tree without ``.git``. It is
imported into ``<workdir>/src/<component>`` as a git repository of its own (one commit
with a fixed date, so the same files make the same commit): the patch step starts from
that commit like from a fetched one, and the user's tree is never written to.

What it was is recorded: the checkout's commit, its submodules' commits and whether it
had changes; the tarball's SHA-256 and size; for every kind the imported commit's git
tree id, a digest of exactly the files built.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from . import BuildFailedError, digests, gitops

TARBALL_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2")
# a plain tree's own build output is not source (edk2: Build/, QEMU: build/)
SKIPPED_TOP = ("Build", "build", ".git")
IMPORT_DATE = "2000-01-01T00:00:00Z"
IMPORT_GIT = ("-c", "user.name=tdxvirt import", "-c", "user.email=tdxvirt@localhost",
              "-c", "core.autocrlf=false", "-c", "gc.auto=0")


def kind_of(path: Path) -> str:
    """"git", "tarball" or "tree"; a one-line InputError for anything else."""
    if path.is_dir():
        return "git" if (path / ".git").exists() else "tree"
    if path.is_file() and path.name.endswith(TARBALL_SUFFIXES):
        return "tarball"
    if path.exists():
        raise InputError(f"--source {path}: not a folder nor a release tarball "
                         f"({', '.join(TARBALL_SUFFIXES)})")
    raise InputError(f"--source {path}: no such file or folder")


def _git(folder: Path, *args: str) -> str:
    result = subprocess.run(["git", "-c", f"safe.directory={folder}", "-C", str(folder), *args],
                            capture_output=True, text=True, check=False, env={**os.environ, **gitops.GIT_ENV})
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise BuildFailedError(f"`git {' '.join(args[:2])}` in {folder} failed: {message}")
    return result.stdout


def describe(path: Path) -> dict:
    """What the source is now: its stamp inputs and, recorded with the build, its identity."""
    kind = kind_of(path)
    if kind == "git":
        changes = hashlib.sha256(_git(path, "diff", "HEAD", "--binary", "--submodule=diff").encode()).hexdigest()
        clean = _git(path, "status", "--porcelain", "--untracked-files=no").strip() == ""
        return {"kind": "git", "path": str(path), "commit": _git(path, "rev-parse", "HEAD").strip(),
                "submodules": submodule_commits(path), "modified": not clean,
                "changes_sha256": None if clean else changes}
    if kind == "tarball":
        try:
            found = digests.digest(path)
        except digests.DigestError as error:
            raise InputError(f"--source: {error}") from None
        return {"kind": "tarball", "path": str(path), **found.to_json()}
    return {"kind": "tree", "path": str(path), "listing_sha256": _listing_digest(path)}


def submodule_commits(path: Path) -> dict[str, str]:
    """``git submodule status --recursive``: path -> the commit checked out."""
    found = {}
    for line in _git(path, "submodule", "status", "--recursive").splitlines():
        parts = line[1:].split()
        if len(parts) >= 2:
            found[parts[1]] = parts[0]
    return found


def _listing_digest(root: Path) -> str:
    """A digest of every file's path, size, time and mode: cheap (no file is read) and
    changed by any edit, so a plain tree is imported again when it changes."""
    digest = hashlib.sha256()
    for relative in sorted(_tree_files(root)):
        info = os.lstat(root / relative)
        digest.update(f"{relative}\0{info.st_size}\0{info.st_mtime_ns}\0{info.st_mode}\n".encode())
    return digest.hexdigest()


def _tree_files(root: Path) -> list[str]:
    files = []
    for folder, dirs, names in os.walk(root):
        relative_folder = os.path.relpath(folder, root)
        if relative_folder == ".":
            dirs[:] = [d for d in dirs if d not in SKIPPED_TOP]
        else:
            dirs[:] = [d for d in dirs if d != ".git"]
        for name in names + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            files.append(os.path.normpath(os.path.join(relative_folder, name)))
    return files


def _checkout_files(root: Path) -> list[str]:
    listed = _git(root, "ls-files", "-z", "--recurse-submodules").split("\0")
    return [name for name in listed if name and os.path.lexists(root / name)]


def _copy(root: Path, names: list[str], target: Path) -> None:
    for name in names:
        source, destination = root / name, target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            os.symlink(os.readlink(source), destination)
        elif source.is_file():
            shutil.copy2(source, destination)


def _unpack(tarball: Path, target: Path, executor) -> None:
    """Unpack with tar, dropping the one top folder release tarballs have (qemu-10.2.0/)."""
    try:
        with tarfile.open(tarball) as archive:
            tops = {member.name.lstrip("./").split("/", 1)[0] for member in archive.getmembers()} - {""}
    except (tarfile.TarError, OSError) as error:
        raise BuildFailedError(f"{tarball} cannot be read as a tar archive: {error}") from None
    strip = ("--strip-components=1",) if len(tops) == 1 else ()
    # GNU tar drops leading '/' and refuses members with '..': nothing lands outside target
    result = executor.command(["tar", "-xf", str(tarball), "-C", str(target), "--no-same-owner", *strip],
                              target.parent)
    if result.returncode != 0:
        raise BuildFailedError(f"`tar -xf {tarball}` exited with {result.returncode}")


@dataclass(frozen=True)
class ImportSource:
    """Make ``tree`` a one-commit git repository holding the source's files."""

    source: Path
    tree: Path

    def show(self) -> list[str]:
        kind = kind_of(self.source)
        what = {"git": f"copy the tracked files of {self.source} (submodules included)",
                "tarball": f"unpack {self.source}",
                "tree": f"copy {self.source} (without {', '.join(SKIPPED_TOP)} at its top)"}[kind]
        return [f"{what} into a new {self.tree}, replacing what is there",
                f"$ git -C {self.tree} add -A && git -C {self.tree} commit  (date {IMPORT_DATE}); "
                f"git -C {self.tree} update-ref {gitops.BASE_REF} HEAD"]

    def run(self, executor) -> None:
        self.tree.parent.mkdir(parents=True, exist_ok=True)
        # made by this run (mkdtemp: a new name, never a folder someone else left there),
        # so the clean-ups below remove only what this run created
        staging = Path(tempfile.mkdtemp(prefix=f".{self.tree.name}.import-", dir=self.tree.parent))
        kind = kind_of(self.source)
        if kind == "tarball":
            _unpack(self.source, staging, executor)
        else:
            names = _checkout_files(self.source) if kind == "git" else _tree_files(self.source)
            _copy(self.source, names, staging)
            executor.note(f"copied {len(names)} files from {self.source}")
        env = {**gitops.GIT_ENV, "GIT_AUTHOR_DATE": IMPORT_DATE, "GIT_COMMITTER_DATE": IMPORT_DATE}
        git = ("git", "-C", str(staging), *IMPORT_GIT)
        for argv in (git + ("init", "--quiet"), git + ("add", "-A", "-f"),
                     git + ("commit", "--quiet", "--allow-empty", "-m", f"imported from {self.source}"),
                     git + ("update-ref", gitops.BASE_REF, "HEAD")):
            result = executor.command(list(argv), staging.parent, env)
            if result.returncode != 0:
                raise BuildFailedError(f"`{' '.join(argv[3:5])}` in {staging} exited with {result.returncode}")
        # swap in only now: an interrupted import leaves the old tree as it was
        if self.tree.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.tree.name}.old-", dir=self.tree.parent))
            self.tree.rename(old / "tree")  # the tree tdxvirt fetched or imported before
            staging.rename(self.tree)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(self.tree)
        executor.note(f"imported {self.source} as {gitops.revision(self.tree)}")
