"""edk2 (OVMF) specifics: Conf/target.txt, toolchain tags, and where OVMF.fd lands.

edk2 writes a platform's images to ``<OUTPUT_DIRECTORY>/<TARGET>_<TOOL_CHAIN_TAG>/FV``,
OUTPUT_DIRECTORY coming from the platform's .dsc (``Build/OvmfX64`` for
OvmfPkg/OvmfPkgX64.dsc, ``Build/IntelTdx`` for the TDX firmware's
OvmfPkg/IntelTdx/IntelTdxX64.dsc). Intel's script hard-codes ``DEBUG_GCC5`` while building
with GCC6 and so looks in the wrong folder: here the path is always derived.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import TdxvirtError
from ..userfile import read_user_file
from . import BuildFailedError
from .manifest import Ovmf

_OUTPUT_DIRECTORY = re.compile(r"^\s*OUTPUT_DIRECTORY\s*=\s*(\S+)", re.MULTILINE)
_TOOLS_DEF_KEY = re.compile(r"^\s*\*?[A-Z0-9*]*_([A-Z][A-Z0-9]*)_[A-Z0-9*]+_[A-Z0-9_*]+\s*=", re.MULTILINE)
# edksetup.sh is sourced (it sets WORKSPACE, PATH, Conf/); a fixed script, the
# command to run comes in as arguments and never becomes shell text
EDKSETUP_THEN_EXEC = 'cmd=("$@"); set --; . ./edksetup.sh >/dev/null && exec "${cmd[@]}"'
EDKSETUP_ONLY = "set --; . ./edksetup.sh"
_GITMODULES_PATH = re.compile(r"^\s*path\s*=\s*(\S+)\s*$", re.MULTILINE)
# BaseTools' C tools; Debian and Ubuntu strip BrotliCompress's embedded brotli from
# their edk2 source package and patch BrotliCompress out of this file's list (OVMF's
# volumes are LZMA-compressed: the tool is not used), so there its empty folder is no gap
BASETOOLS_MAKEFILE = "BaseTools/Source/C/GNUmakefile"
BROTLI_COMPRESS = "BaseTools/Source/C/BrotliCompress/brotli"
_SMALL_FILE = 1024 * 1024


def target_txt(ovmf: Ovmf, jobs: int) -> str:
    """Conf/target.txt exactly as Intel's build_ovmf.sh writes it."""
    return (
        f"ACTIVE_PLATFORM = {ovmf.platform}\n"
        f"TARGET = {ovmf.target}\n"
        f"TARGET_ARCH = {ovmf.arch}\n"
        "TOOL_CHAIN_CONF = Conf/tools_def.txt\n"
        f"TOOL_CHAIN_TAG = {ovmf.toolchain}\n"
        "BUILD_RULE_CONF = Conf/build_rule.txt\n"
        f"MAX_CONCURRENT_THREAD_NUMBER = {jobs}\n"
    )


def output_directory(tree: Path, platform: str) -> str | None:
    """The .dsc's OUTPUT_DIRECTORY (``Build/OvmfX64``), None before the tree exists."""
    try:
        text = (tree / platform).read_text(errors="replace")
    except OSError:
        return None
    match = _OUTPUT_DIRECTORY.search(text)
    return match.group(1).strip("/") if match else None


def image_path(tree: Path, ovmf: Ovmf) -> Path | None:
    """Where the build puts OVMF.fd; None while the .dsc is not there to say."""
    directory = output_directory(tree, ovmf.platform)
    if directory is None:
        return None
    return tree / directory / f"{ovmf.target}_{ovmf.toolchain}" / "FV" / "OVMF.fd"


def image_path_text(tree: Path, ovmf: Ovmf) -> str:
    path = image_path(tree, ovmf)
    if path is not None:
        return str(path)
    return f"{tree}/<OUTPUT_DIRECTORY of {ovmf.platform}>/{ovmf.target}_{ovmf.toolchain}/FV/OVMF.fd"


def toolchain_tags(tools_def: str) -> set[str]:
    """Tags defined in Conf/tools_def.txt (keys look like ``DEBUG_GCC5_X64_CC_FLAGS``)."""
    return set(_TOOLS_DEF_KEY.findall(tools_def))


class CheckToolchain:
    """Fail in seconds, not after BaseTools and hours of build, on an unknown tag."""

    def __init__(self, tree: Path, tag: str):
        self.tree = tree
        self.tag = tag

    def show(self) -> list[str]:
        return [f"check that Conf/tools_def.txt defines TOOL_CHAIN_TAG {self.tag}"]

    def run(self, executor) -> None:
        tools_def = self.tree / "Conf" / "tools_def.txt"
        try:
            tags = toolchain_tags(tools_def.read_text(errors="replace"))
        except OSError:
            raise BuildFailedError(f"{tools_def} is missing: edksetup.sh did not create Conf/") from None
        if self.tag not in tags:
            known = ", ".join(sorted(tags)) or "none"
            raise BuildFailedError(f"toolchain tag {self.tag} is not defined in {tools_def} "
                                   f"(defined: {known}); set ovmf.toolchain in the manifest")
        executor.note(f"toolchain tag {self.tag} is defined in {tools_def}")


def _small_text(path: Path) -> str | None:
    """A small text file of the tree (regular only, bounded); None if it is not there."""
    try:
        return read_user_file(path, "edk2 file", limit=_SMALL_FILE).decode(errors="replace")
    except TdxvirtError:
        return None


def needed_submodules(tree: Path, paths: tuple[str, ...]) -> list[str]:
    """Of ``paths``, those this tree builds from: declared in its .gitmodules (an older
    edk2 without one does not need it), BaseTools' brotli only while BaseTools builds
    BrotliCompress."""
    declared = set(_GITMODULES_PATH.findall(_small_text(tree / ".gitmodules") or ""))
    makefile = _small_text(tree / BASETOOLS_MAKEFILE) or ""
    return [path for path in paths if path in declared
            and (path != BROTLI_COMPRESS or "BrotliCompress" in makefile)]


def empty_submodules(tree: Path, paths: tuple[str, ...]) -> list[str]:
    """The needed submodules whose folder has no file: a source tree without them builds
    BaseTools, then fails deep in the build."""
    return [path for path in needed_submodules(tree, paths)
            if not (tree / path).is_dir() or not any((tree / path).iterdir())]


class CheckSubmodules:
    """Fail in seconds, naming the folders, when the tree lacks submodules' files (a git
    checkout cloned without --recurse-submodules, a source package's stripped tarball)."""

    def __init__(self, tree: Path, paths: tuple[str, ...]):
        self.tree = tree
        self.paths = paths

    def show(self) -> list[str]:
        return [f"check that these submodules have their files: {' '.join(self.paths)}"]

    def run(self, executor) -> None:
        empty = empty_submodules(self.tree, self.paths)
        if empty:
            raise BuildFailedError(
                f"{self.tree} has no files in the submodule folder(s) {', '.join(empty)}; from a git "
                "checkout run `git submodule update --init` in it, from a distribution's source package "
                "use its unpacked tree with the package's patches applied (Debian: `dpkg-source -x`), "
                "not its .orig tarball alone")
        needed = needed_submodules(self.tree, self.paths)
        others = [path for path in self.paths if path not in needed]
        executor.note(f"the needed submodules have their files: {' '.join(needed) or 'none'}"
                      + (f"; not needed by this tree: {' '.join(others)}" if others else ""))
