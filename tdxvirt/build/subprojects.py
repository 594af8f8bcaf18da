"""QEMU's meson subprojects offline: mirrors for their downloads, retries that work, and
their revisions in the record.

QEMU's configure has meson download the subprojects a git checkout lacks
(``subprojects/*.wrap``: keycodemapdb, berkeley-softfloat-3 and berkeley-testfloat-3
with TCG, dtc without a system libfdt, ...). meson runs git for that, so the manifest's
mirrors reach it as git configuration in the environment of configure only
(``GIT_CONFIG_COUNT``/``GIT_CONFIG_KEY_n``/``GIT_CONFIG_VALUE_n``, git's own way to
pass ``-c`` to every git a program starts). A release tarball ships the subprojects and
needs none of it.

A download that fails leaves an empty ``subprojects/<name>`` (or one holding only the
``.git`` meson initialised); meson then refuses it on every later run ("Subproject
exists but has no meson.build file") or takes it as downloaded, so such folders are
removed before configure runs again.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import TdxvirtError
from ..userfile import read_user_file
from .manifest import Mirror

WRAP_LIMIT = 64 * 1024  # a wrap file is a few lines


@dataclass(frozen=True)
class Wrap:
    name: str  # the .wrap file's name without .wrap
    kind: str  # "git" or "file"
    directory: str  # the folder under subprojects/
    url: str | None  # wrap-git: the repository
    revision: str | None  # wrap-git: the commit (or tag, branch) meson checks out
    source_hash: str | None  # wrap-file: the SHA-256 of the archive


def read_wraps(tree: Path) -> list[Wrap]:
    """The wrap-git and wrap-file subprojects in ``tree/subprojects`` (others are skipped)."""
    found = []
    for file in sorted((tree / "subprojects").glob("*.wrap")):
        parser = configparser.ConfigParser(interpolation=None)
        try:  # a source's file: regular and bounded (a FIFO or a huge file is no wrap)
            parser.read_string(read_user_file(file, "wrap file", limit=WRAP_LIMIT).decode())
        except (configparser.Error, UnicodeDecodeError, TdxvirtError):
            continue  # meson will name a broken wrap file itself
        name = file.name[:-len(".wrap")]
        for section, kind in (("wrap-git", "git"), ("wrap-file", "file")):
            if parser.has_section(section):
                get = parser[section].get
                directory = get("directory", name)
                if directory in ("", ".", "..") or "/" in directory or "\\" in directory:
                    break  # not one folder under subprojects/: nothing tdxvirt reads or removes
                found.append(Wrap(name=name, kind=kind, directory=directory, url=get("url"),
                                  revision=get("revision"), source_hash=get("source_hash")))
                break
    return found


def git_config_env(mirrors: tuple[Mirror, ...]) -> dict[str, str]:
    """The mirrors as environment for every git a program (meson) starts."""
    pairs = [(f"url.{mirror.base}.insteadOf", mirror.prefix) for mirror in mirrors]
    if any(mirror.local for mirror in mirrors):
        pairs.append(("protocol.file.allow", "always"))
    if not pairs:
        return {}
    env = {"GIT_CONFIG_COUNT": str(len(pairs))}
    for i, (key, value) in enumerate(pairs):
        env[f"GIT_CONFIG_KEY_{i}"] = key
        env[f"GIT_CONFIG_VALUE_{i}"] = value
    return env


def empty_directories(tree: Path) -> list[Path]:
    """Subproject folders a failed download left without a file: empty, or holding only
    the ``.git`` meson initialised before its fetch failed (meson 1.x then says
    "Already downloaded" and the build fails later)."""
    return [folder for folder in (tree / "subprojects" / wrap.directory for wrap in read_wraps(tree))
            if folder.is_dir() and not folder.is_symlink() and _holds_nothing(folder)]


def _holds_nothing(folder: Path) -> bool:
    return all(entry.name == ".git" for entry in folder.iterdir())


@dataclass(frozen=True)
class ClearFailedDownloads:
    """Remove the empty subproject folders a failed download left, so meson tries again."""

    tree: Path

    def show(self) -> list[str]:
        # only what there is to remove now (usually nothing: a fresh tree has none)
        return [f"remove {folder}: empty, left by a failed download (meson refuses it: "
                "\"Subproject exists but has no meson.build file\")" for folder in empty_directories(self.tree)]

    def run(self, executor) -> None:
        for folder in empty_directories(self.tree):
            shutil.rmtree(folder)
            executor.note(f"removed {folder}: empty, left by a failed download; meson downloads it again")


def revisions(tree: Path) -> dict[str, dict]:
    """Per subproject: what its wrap asks for and what is there (the checked-out commit
    for a git download; the files shipped for a release tarball)."""
    found = {}
    for wrap in read_wraps(tree):
        folder = tree / "subprojects" / wrap.directory
        entry: dict = {"kind": wrap.kind}
        if wrap.kind == "git":
            entry.update(url=wrap.url, wrap_revision=wrap.revision)
        else:
            entry["source_hash"] = wrap.source_hash
        if not folder.is_dir() or _holds_nothing(folder):
            entry["state"] = "absent"  # not needed by this configuration, or not downloaded
        elif (folder / ".git").exists():
            entry.update(state="downloaded", revision=_head(folder))
        else:
            entry["state"] = "shipped"  # in the source (a release tarball) or unpacked from an archive
        found[wrap.name] = entry
    return found


def _head(folder: Path) -> str | None:
    try:
        result = subprocess.run(["git", "-c", f"safe.directory={folder}", "-C", str(folder), "rev-parse",
                                 "--verify", "--quiet", "HEAD^{commit}"],
                                capture_output=True, text=True, check=False,
                                env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    except FileNotFoundError:
        return None
    return result.stdout.strip() or None
