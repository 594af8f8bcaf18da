"""scripts/build-smoke: it parses, refuses bad arguments in one line, and --dry-run runs nothing.

The smoke run itself (a real edk2 build, minutes to an hour) is not part of the tests:
it needs an edk2 tree with its submodules, nasm and iasl, and the simulated host.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "build-smoke"


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, check=False)


def _edk2_tree(base: Path, submodules_filled: bool = True) -> Path:
    """The files the script looks at before building: edksetup.sh, the TDX .dsc, .gitmodules."""
    tree = base / "edk2"
    (tree / "OvmfPkg/IntelTdx").mkdir(parents=True)
    (tree / "edksetup.sh").write_text("# edksetup\n")
    (tree / "OvmfPkg/IntelTdx/IntelTdxX64.dsc").write_text("[Defines]\n  OUTPUT_DIRECTORY = Build/IntelTdx\n")
    subs = ["CryptoPkg/Library/OpensslLib/openssl", "BaseTools/Source/C/BrotliCompress/brotli"]
    (tree / ".gitmodules").write_text("".join(
        f'[submodule "{s}"]\n\tpath = {s}\n\turl = https://example.org/{Path(s).name}\n' for s in subs))
    for sub in subs:
        (tree / sub).mkdir(parents=True)
        if submodules_filled:
            (tree / sub / "README").write_text("content\n")
    return tree


def test_it_parses_and_documents_itself():
    assert os.access(SCRIPT, os.X_OK)
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0
    help_text = _run("--help")
    assert help_text.returncode == 0
    assert "--source DIR|TARBALL" in help_text.stdout and "--dry-run" in help_text.stdout
    assert "--mirror PREFIX=MIRROR" in help_text.stdout and "--update" in help_text.stdout
    assert "set -euo" not in help_text.stdout


@pytest.mark.parametrize("args, message", [
    ((), "give --source DIR|TARBALL (an edk2 tree with its submodules, or its tarball) or --mirror"),
    (("--edk2-tree",), "--edk2-tree needs a value"),
    (("--edk2-tree", "/nonexistent/edk2"), "--source /nonexistent/edk2: no such folder"),
    (("--source", "{tree}/edksetup.sh"), "--source {tree}/edksetup.sh: not a folder nor a tarball"),
    (("--source", "{tree}", "--mirror", "https://github.com/=/srv/m/"), "--source and --mirror exclude each other"),
    (("--mirror", "/srv/mirrors"), "--mirror '/srv/mirrors': give PREFIX=MIRROR"),
    (("--edk2-tree", "{tree}", "-j", "0"), "-j '0': give a whole number of jobs >= 1"),
    (("--edk2-tree", "{tree}", "--jobs=many"), "-j 'many': give a whole number"),
    (("--edk2-tree", "{tree}", "--target", "FAST"), "--target 'FAST': use DEBUG, RELEASE or NOOPT"),
    (("--edk2-tree", "{tree}", "--toolchain", "gcc; rm"), "--toolchain 'gcc; rm': use capital letters"),
    (("--edk2-tree", "{tree}", "--name", "../x"), "--name '../x': letters, digits"),
    (("--edk2-tree", "{tree}", "--frobnicate"), "unknown argument '--frobnicate'"),
    (("--edk2-tree", "{empty}"), "no edksetup.sh: not an edk2 tree"),
    (("--edk2-tree", "{hollow}"), "submodule CryptoPkg/Library/OpensslLib/openssl is empty; run "
                                  "`git -C {hollow} submodule update --init`"),
])
def test_bad_arguments_are_one_line_refusals(tmp_path, args, message):
    places = {"tree": str(_edk2_tree(tmp_path / "good")), "empty": str(tmp_path),
              "hollow": str(_edk2_tree(tmp_path / "hollow", submodules_filled=False))}
    result = _run(*(a.format(**places) for a in args))
    assert result.returncode == 2, result.stdout + result.stderr
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1, error
    assert error.startswith("build-smoke: ") and message.format(**places) in error


def test_dry_run_prints_the_steps_and_creates_nothing(tmp_path):
    tree = _edk2_tree(tmp_path)
    workdir = tmp_path / "work"
    result = _run("--edk2-tree", str(tree), "--dry-run", "-j", "3", "--workdir", str(workdir),
                  "--toolchain", "GCC5", "--target", "DEBUG", "--name", "smoke-td")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"build-smoke: edk2 tree {tree} -> OvmfPkg/IntelTdx/IntelTdxX64.dsc, DEBUG, X64, tool chain GCC5, -j 3" in out
    assert 'with target = "DEBUG", toolchain = "GCC5"' in out
    # the tree goes to tdxvirt's own --source import: the script copies nothing itself
    assert (f"$ TDXVIRT_STATE_DIR={workdir}/state tdxvirt build run ovmf --all --manifest "
            f"{workdir}/smoke.toml --workdir {workdir}/build -j 3 --source {tree}\n") in out
    assert "$ tdxvirt --sim define smoke-td --gpu 38:00.0 --allow-shared --ovmf <the built OVMF.fd>" in out
    assert "$ tdxvirt --sim undefine smoke-td" in out
    assert not workdir.exists()
    kept = _run("--edk2-tree", str(tree), "--dry-run", "--keep", "--workdir", str(workdir))
    assert "undefine" not in kept.stdout and not workdir.exists()


def test_a_tarball_or_mirrors_instead_of_a_tree(tmp_path):
    tarball = tmp_path / "edk2_2025.02.orig.tar.xz"
    tarball.write_bytes(b"not looked into before the build\n")
    workdir = tmp_path / "work"
    result = _run("--source", str(tarball), "--dry-run", "-j", "2", "--workdir", str(workdir), "--update")
    assert result.returncode == 0, result.stderr
    assert f"build-smoke: edk2 tarball {tarball} -> OvmfPkg/IntelTdx/IntelTdxX64.dsc, RELEASE" in result.stdout
    assert f"-j 2 --source {tarball} --update\n" in result.stdout
    mirrored = _run("--mirror", "https://github.com/=/srv/mirrors/", "--mirror=https://gitlab.com/=/srv/gl/",
                    "--dry-run", "--workdir", str(workdir))
    assert mirrored.returncode == 0, mirrored.stderr
    assert "build-smoke: edk2 through --mirror https://github.com/=/srv/mirrors/" in mirrored.stdout
    assert ("--mirror https://github.com/=/srv/mirrors/ --mirror https://gitlab.com/=/srv/gl/\n"
            in mirrored.stdout)
    assert "--source" not in mirrored.stdout.split("$ TDXVIRT_STATE_DIR")[1]
    assert not workdir.exists()


def test_a_debian_source_tree_without_basetools_brotli_is_accepted(tmp_path):
    # Debian strips BaseTools' brotli and patches BrotliCompress out of BaseTools' GNUmakefile
    tree = _edk2_tree(tmp_path)
    (tree / "BaseTools/Source/C/BrotliCompress/brotli/README").unlink()
    (tree / "BaseTools/Source/C/GNUmakefile").write_text("APPLICATIONS = \\\n  VfrCompile \\\n  EfiRom\n")
    assert _run("--source", str(tree), "--dry-run").returncode == 0
    # upstream's GNUmakefile still builds it: then the empty folder is refused
    (tree / "BaseTools/Source/C/GNUmakefile").write_text("APPLICATIONS = \\\n  BrotliCompress \\\n  EfiRom\n")
    refused = _run("--source", str(tree), "--dry-run")
    assert refused.returncode == 2
    assert "submodule BaseTools/Source/C/BrotliCompress/brotli is empty" in refused.stderr
