"""edk2 source trees as they really come: a git checkout without its submodules, a
distribution's stripped source package, an older edk2. The OVMF configure step checks
the submodule folders the manifest needs before it builds BaseTools, and refuses in one
line only what would fail later.

The trees are small fakes with edk2's real layout (.gitmodules, BaseTools' GNUmakefile):
Debian's edk2 2025.02 source package strips BaseTools' embedded brotli from its .orig
tarball and patches BrotliCompress out of that GNUmakefile (brotlicompress-disable.diff).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tdxvirt.build import BuildFailedError, edk2
from tdxvirt.build import manifest as manifests
from tdxvirt.cli import TdxvirtGroup
from tdxvirt.cli.build import build

OPENSSL = "CryptoPkg/Library/OpensslLib/openssl"
DECOMPRESS = "MdeModulePkg/Library/BrotliCustomDecompressLib/brotli"
MAKEFILE = "LIBRARIES = Common\nAPPLICATIONS = \\\n{brotli}  VfrCompile \\\n  EfiRom \\\n  GenFfs\n"


def _tree(base: Path, *, filled=(OPENSSL, DECOMPRESS), builds_brotli=True, declared=None) -> Path:
    tree = base / "edk2"
    (tree / "OvmfPkg/IntelTdx").mkdir(parents=True)
    (tree / "edksetup.sh").write_text("# edksetup\n")
    (tree / "OvmfPkg/IntelTdx/IntelTdxX64.dsc").write_text("[Defines]\n  OUTPUT_DIRECTORY = Build/IntelTdx\n")
    subs = declared if declared is not None else (OPENSSL, DECOMPRESS, edk2.BROTLI_COMPRESS)
    (tree / ".gitmodules").write_text("".join(
        f'[submodule "{s}"]\n\tpath = {s}\n\turl = https://example.org/{Path(s).name}\n' for s in subs))
    for sub in subs:
        (tree / sub).mkdir(parents=True)
        if sub in filled:
            (tree / sub / "README").write_text("content\n")
    (tree / edk2.BASETOOLS_MAKEFILE).parent.mkdir(parents=True, exist_ok=True)
    (tree / edk2.BASETOOLS_MAKEFILE).write_text(
        MAKEFILE.format(brotli="  BrotliCompress \\\n" if builds_brotli else ""))
    return tree


class _Notes:
    def __init__(self):
        self.lines = []

    def note(self, text):
        self.lines.append(text)


NEEDED = (OPENSSL, DECOMPRESS, edk2.BROTLI_COMPRESS, "SecurityPkg/DeviceSecurity/SpdmLib/libspdm")


def test_a_debian_source_tree_passes_its_stripped_tarball_is_refused(tmp_path):
    # the unpacked package (patches applied): BaseTools no longer builds BrotliCompress
    patched = _tree(tmp_path / "patched", builds_brotli=False)
    notes = _Notes()
    edk2.CheckSubmodules(patched, NEEDED).run(notes)
    assert notes.lines == [f"the needed submodules have their files: {OPENSSL} {DECOMPRESS}; not needed by "
                           f"this tree: {edk2.BROTLI_COMPRESS} SecurityPkg/DeviceSecurity/SpdmLib/libspdm"]
    # the .orig tarball alone: BaseTools would stop at BrotliCompress.c, missing brotli's headers
    orig = _tree(tmp_path / "orig", builds_brotli=True)
    assert edk2.empty_submodules(orig, NEEDED) == [edk2.BROTLI_COMPRESS]
    with pytest.raises(BuildFailedError) as error:
        edk2.CheckSubmodules(orig, NEEDED).run(_Notes())
    message = str(error.value)
    assert "\n" not in message
    assert f"{orig} has no files in the submodule folder(s) {edk2.BROTLI_COMPRESS}" in message
    assert "git submodule update --init" in message and "dpkg-source -x" in message


def test_a_checkout_without_submodules_names_each_empty_one(tmp_path):
    tree = _tree(tmp_path, filled=())
    assert edk2.empty_submodules(tree, NEEDED) == [OPENSSL, DECOMPRESS, edk2.BROTLI_COMPRESS]
    # a folder removed altogether counts as empty too
    (tree / DECOMPRESS).rmdir()
    assert DECOMPRESS in edk2.empty_submodules(tree, NEEDED)


def test_an_older_edk2_without_a_listed_submodule_is_not_refused(tmp_path):
    # libspdm came with edk2-stable202408: a tree that does not declare it does not need it
    tree = _tree(tmp_path)
    (tree / edk2.BROTLI_COMPRESS / "README").write_text("content\n")
    assert edk2.empty_submodules(tree, NEEDED) == []
    # no .gitmodules at all (a tree someone trimmed): nothing to tell, nothing refused
    (tree / ".gitmodules").unlink()
    (tree / OPENSSL / "README").unlink()
    assert edk2.empty_submodules(tree, NEEDED) == []


def test_a_gitmodules_that_is_not_a_regular_file_is_not_read(tmp_path):
    import os

    tree = _tree(tmp_path, filled=())
    (tree / ".gitmodules").unlink()
    os.mkfifo(tree / ".gitmodules")  # a FIFO must not hang the check
    assert edk2.empty_submodules(tree, NEEDED) == []


def test_the_plan_checks_the_manifests_submodules_before_basetools(tmp_path, monkeypatch):
    monkeypatch.setenv("TDXVIRT_STATE_DIR", str(tmp_path / "state"))
    tree = _tree(tmp_path)
    group = TdxvirtGroup(name="tdxvirt", commands={"build": build})
    result = CliRunner().invoke(group, ["build", "plan", "ovmf", "--source", str(tree), "--workdir",
                                        str(tmp_path / "w"), "-j", "2", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    configure = next(s for s in json.loads(result.stdout)["steps"] if s["step"] == "configure")
    wanted = manifests.load("upstream").ovmf.repo.submodules
    assert configure["commands"][0] == f"check that these submodules have their files: {' '.join(wanted)}"
    assert "make -j2 -C BaseTools" in configure["commands"][1]
    assert not (tmp_path / "w").exists()
