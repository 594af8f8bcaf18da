"""``--source``: a component built from a local git checkout (with a real submodule and a
local change), a release tarball, or an unpacked tree; real git, tar and make, through
the real CLI. The user's source is never written to; the record says what it was.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from gitrepo import commit, git
from test_build_runner import Sources, provide_qemu_libraries

from tdxvirt.build import artifacts
from tdxvirt.cli import TdxvirtGroup
from tdxvirt.cli.build import build


@pytest.fixture(autouse=True)
def qemu_libraries(tmp_path, monkeypatch):
    provide_qemu_libraries(tmp_path / "pkgconfig", monkeypatch)


@pytest.fixture
def setup(tmp_path, state):
    sources = Sources(tmp_path)
    manifest = sources.manifest(tmp_path / "m.toml", ["--enable-kvm"])
    group = TdxvirtGroup(name="tdxvirt", commands={"build": build})

    def run(*args):
        result = CliRunner().invoke(group, ["build", "run", "qemu", "--manifest", str(manifest),
                                            "--workdir", str(tmp_path / "work"), *map(str, args)])
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        return result

    return sources, run


def _version(tmp_path: Path) -> str:
    binary = tmp_path / "work/src/qemu/build/qemu-system-x86_64"
    return subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout.strip()


def _tracked_state(repo: Path) -> tuple[str, str, list[str]]:
    return git(repo, "rev-parse", "HEAD"), git(repo, "status", "--porcelain"), sorted(p.name for p in repo.iterdir())


def test_a_git_checkout_with_a_submodule_and_a_local_change(setup, tmp_path, state):
    sources, run = setup
    sub = tmp_path / "keycodemapdb"
    sub.mkdir()
    git(sub, "init", "-q", "-b", "master")
    sub_commit = commit(sub, {"keymaps.csv": "KEY_A,30\n"}, "keycodemapdb")
    checkout = tmp_path / "checkout"
    git(tmp_path, "clone", "-q", "--branch", "v9.1.0-rc0", str(sources.qemu), str(checkout))
    git(checkout, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(sub), "subprojects/keycodemapdb")
    top = commit(checkout, {}, "add keycodemapdb")
    (checkout / "version.txt").write_text("9.0.90\n")  # unchanged content, rewritten: still clean
    before = _tracked_state(checkout)

    result = run("--source", checkout)
    assert result.exit_code == 0, result.output
    assert "qemu source: running" in result.output
    assert _tracked_state(checkout) == before  # built elsewhere: nothing written into the checkout
    tree = tmp_path / "work/src/qemu"
    assert (tree / "subprojects/keycodemapdb/keymaps.csv").read_text() == "KEY_A,30\n"  # the submodule's files
    assert _version(tmp_path).startswith("QEMU emulator version 9.0.90-tdx ")  # the patch set applied on top
    entry = artifacts.load(artifacts.record_file(state))["qemu"]
    assert entry["url"] == str(checkout) and entry["ref"] == "local git"
    assert entry["source"]["commit"] == top
    assert entry["source"]["submodules"] == {"subprojects/keycodemapdb": sub_commit}
    assert entry["source"]["modified"] is False
    assert entry["source"]["git_tree"] == git(tree, "rev-parse", "refs/tdxvirt/base^{tree}")

    # nothing changed: nothing to do
    again = run("--source", checkout)
    assert "Nothing to do" in again.output, again.output
    # a local change (uncommitted) is built, and recorded as such
    with open(checkout / "configure", "a") as configure:
        configure.write("# a local change\n")
    changed = run("--source", checkout)
    assert changed.exit_code == 0, changed.output
    assert "qemu source: running" in changed.output
    assert (tree / "configure").read_text().endswith("# a local change\n")
    entry = artifacts.load(artifacts.record_file(state))["qemu"]
    assert entry["source"]["modified"] is True
    assert entry["source"]["changes_sha256"] == hashlib.sha256(
        git(checkout, "diff", "HEAD", "--binary", "--submodule=diff").encode() + b"\n").hexdigest()


def test_a_release_tarball_and_an_unpacked_tree(setup, tmp_path, state):
    sources, run = setup
    unpacked = tmp_path / "qemu-9.1.0-rc0"
    git(tmp_path, "clone", "-q", "--branch", "v9.1.0-rc0", str(sources.qemu), str(unpacked))
    subprocess.run(["rm", "-rf", str(unpacked / ".git")], check=True)
    (unpacked / "subprojects/dtc").mkdir(parents=True)  # a release tarball ships its subprojects
    (unpacked / "subprojects/dtc/meson.build").write_text("project('dtc')\n")
    tarball = tmp_path / "qemu-9.1.0-rc0.tar.xz"
    subprocess.run(["tar", "-C", str(tmp_path), "-cJf", str(tarball), unpacked.name], check=True)

    result = run("--source", tarball)
    assert result.exit_code == 0, result.output
    tree = tmp_path / "work/src/qemu"
    assert (tree / "subprojects/dtc/meson.build").is_file() and (tree / "configure").is_file()  # top folder dropped
    assert _version(tmp_path).startswith("QEMU emulator version 9.0.90-tdx ")
    entry = artifacts.load(artifacts.record_file(state))["qemu"]
    data = tarball.read_bytes()
    assert entry["source"]["kind"] == "tarball" and entry["ref"] == "local tarball"
    assert (entry["source"]["sha256"], entry["source"]["size"]) == (hashlib.sha256(data).hexdigest(), len(data))

    # the same files unpacked make the same git tree (the commit names its source)
    imported = git(tree, "rev-parse", "refs/tdxvirt/base^{tree}")
    result = run("--source", unpacked)
    assert result.exit_code == 0, result.output
    assert git(tree, "rev-parse", "refs/tdxvirt/base^{tree}") == imported
    assert artifacts.load(artifacts.record_file(state))["qemu"]["source"]["kind"] == "tree"
    (unpacked / "version.txt").write_text("9.0.99\n")
    result = run("--source", unpacked)
    assert "qemu source: running" in result.output
    assert git(tree, "rev-parse", "refs/tdxvirt/base^{tree}") != imported
    assert (tree / "version.txt").read_text() == "9.0.99\n"


def test_dry_run_and_refusals(setup, tmp_path, state):
    _, run = setup
    checkout = tmp_path / "upstream/qemu"
    dry = run("--source", checkout, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert f"copy the tracked files of {checkout} (submodules included) into a new {tmp_path}/work/src/qemu" in dry.output
    assert not (tmp_path / "work").exists()
    group = TdxvirtGroup(name="tdxvirt", commands={"build": build})
    notes = tmp_path / "notes.txt"
    notes.write_text("not a tarball\n")
    for args, message in ((["run", "--source", str(checkout)], "--source builds one component: name it"),
                          (["run", "qemu", "--source", str(tmp_path / "nope")], f"--source {tmp_path}/nope: no such file or folder"),
                          (["plan", "qemu", "--source", str(notes)], f"--source {notes}: not a folder nor a release tarball")):
        result = CliRunner().invoke(group, ["build", *args])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"tdxvirt: error: {message}"), lines
    assert json.loads(CliRunner().invoke(group, ["build", "status", "--json"]).output) == {}


def test_an_import_replaces_only_its_own_tree_and_leaves_neighbours(tmp_path):
    """The import stages and retires folders it made itself (new names): a folder a user
    left beside the tree under a name the import once used stays."""
    from tdxvirt.build.source import ImportSource

    source = tmp_path / "edk2"
    (source / "OvmfPkg").mkdir(parents=True)
    (source / "OvmfPkg/README").write_text("tree\n")
    tree = tmp_path / "work/src/ovmf"
    neighbours = [tree.with_name("ovmf.old"), tree.with_name("ovmf.import")]
    for folder in neighbours:
        folder.mkdir(parents=True)
        (folder / "keep").write_text("someone's\n")

    class Run:  # the executor's two methods the import uses
        def command(self, argv, cwd, env=None):
            return subprocess.run(argv, cwd=cwd, env=env, capture_output=True)

        def note(self, text):
            pass

    for _ in range(2):  # once fresh, once replacing the tree it made
        ImportSource(source, tree).run(Run())
        assert (tree / "OvmfPkg/README").read_text() == "tree\n"
    assert all((folder / "keep").read_text() == "someone's\n" for folder in neighbours)
    assert sorted(p.name for p in tree.parent.iterdir()) == ["ovmf", "ovmf.import", "ovmf.old"]
