"""QEMU's meson subprojects offline: a real `meson subprojects download` (as QEMU's
configure runs it) reaches a local mirror through the manifest's mirrors; the folder a
failed download left is removed before the retry; the record names each subproject's
revision. Real git and meson; the wrap's URL is under .invalid (no network).
"""

from __future__ import annotations

import io
import os
import shutil
import sys
from pathlib import Path

import pytest
from gitrepo import commit, git
from test_build_runner import provide_qemu_libraries

from tdxvirt.build import BuildFailedError, artifacts, progress, runner, steps, subprojects
from tdxvirt.build import manifest as manifests
from tdxvirt.host import HostRoot

UPSTREAM = "https://gitlab.mirror-test.invalid/qemu-project/"


def _meson() -> str | None:
    beside = Path(sys.executable).parent / "meson"  # the test venv's, not on PATH
    return shutil.which("meson") or (str(beside) if beside.exists() else None)


# what QEMU's configure does with its subprojects, then a build/ for the next steps
CONFIGURE = """#!/bin/sh
set -e
meson subprojects download keycodemapdb
mkdir -p build
echo configured > build/config.mak
"""
MAKEFILE = """build/qemu-system-x86_64: subprojects/keycodemapdb/keymaps.csv
\tprintf '#!/bin/sh\\necho keymaps %s\\n' "$$(cat subprojects/keycodemapdb/keymaps.csv)" > $@
\tchmod +x $@
"""


class QemuWithWrap:
    def __init__(self, base: Path):
        work = base / "repos"
        keycodes = work / "keycodemapdb"
        keycodes.mkdir(parents=True)
        git(keycodes, "init", "-q", "-b", "master")
        self.revision = commit(keycodes, {"keymaps.csv": "KEY_A,30\n", "meson.build": "project('keycodemapdb')\n"},
                               "keycodemapdb")
        self.mirrors = base / "mirrors"
        (self.mirrors / "qemu-project").mkdir(parents=True)
        git(work, "clone", "-q", "--mirror", str(keycodes), str(self.mirrors / "qemu-project/keycodemapdb.git"))
        self.qemu = work / "qemu"
        self.qemu.mkdir()
        git(self.qemu, "init", "-q", "-b", "master")
        commit(self.qemu, {"configure": CONFIGURE, "Makefile": MAKEFILE, "meson.build": "project('qemu', 'c')\n",
                           "subprojects/keycodemapdb.wrap": f"[wrap-git]\nurl = {UPSTREAM}keycodemapdb.git\n"
                                                            f"revision = {self.revision}\ndepth = 1\n",
                           "subprojects/dtc.wrap": "[wrap-git]\nurl = https://gitlab.mirror-test.invalid/dtc.git\n"
                                                   "revision = b6910bec11614980a21e46fbccc35934b671bd81\n"},
               "qemu")
        (self.qemu / "configure").chmod(0o755)
        git(self.qemu, "add", "configure")
        git(self.qemu, "commit", "-q", "-m", "executable configure")
        git(self.qemu, "tag", "v10.2.0")


def _run(manifest: Path, workdir: Path, state: Path, mirrors=()):
    loaded = manifests.with_mirrors(manifests.load(manifest), tuple(mirrors))
    ctx = steps.Context(loaded, workdir, jobs=1, install=False, host=HostRoot("/"))
    return runner.run(steps.plan(loaded, ("qemu",), False), ctx, progress.ConsoleReporter(io.StringIO(), live=False),
                      artifacts.record_file(state))


@pytest.mark.skipif(_meson() is None, reason="meson is not installed (pip install meson, or Debian: meson)")
def test_subprojects_come_from_the_mirror_and_a_failed_download_is_retried(tmp_path, monkeypatch):
    provide_qemu_libraries(tmp_path / "pkgconfig", monkeypatch)
    monkeypatch.setenv("PATH", f"{Path(_meson()).parent}:{os.environ['PATH']}")
    sources = QemuWithWrap(tmp_path)
    manifest = tmp_path / "m.toml"
    manifest.write_text(f'[qemu]\nurl = "{sources.qemu}"\nref = "v10.2.0"\nconfigure = []\n')
    workdir, state = tmp_path / "work", tmp_path / "state"
    tree = workdir / "src/qemu"

    # no mirror: meson cannot download, and leaves the folder behind
    with pytest.raises(BuildFailedError, match=r"^qemu configure failed: `\./configure` exited with 1"):
        _run(manifest, workdir, state)
    left = tree / "subprojects/keycodemapdb"
    assert left.is_dir() and subprojects.empty_directories(tree) == [left]

    # with the mirror: the left folder is removed, meson downloads from the mirror
    summary = _run(manifest, workdir, state, [f"{UPSTREAM}={sources.mirrors}/qemu-project/"])
    assert summary.executed == ["qemu.configure", "qemu.build"]
    log = (workdir / "logs/qemu.configure.log").read_text()
    assert f"removed {left}: empty, left by a failed download" in log
    assert "Download keycodemapdb...\n  -> done" in log
    # what plan and --dry-run show: the mirrors in configure's environment only
    loaded = manifests.with_mirrors(manifests.load(manifest), (f"{UPSTREAM}={sources.mirrors}/qemu-project/",))
    ctx = steps.Context(loaded, workdir, jobs=1, install=False, host=HostRoot("/"))
    assert steps.QemuConfigure().actions(ctx)[-1].show() == [
        f"$ cd {tree} && GIT_CONFIG_COUNT=2 GIT_CONFIG_KEY_0=url.{sources.mirrors}/qemu-project/.insteadOf "
        f"GIT_CONFIG_VALUE_0={UPSTREAM} GIT_CONFIG_KEY_1=protocol.file.allow GIT_CONFIG_VALUE_1=always ./configure"]
    assert git(left, "rev-parse", "HEAD") == sources.revision
    assert (left / "keymaps.csv").read_text() == "KEY_A,30\n"
    assert "insteadof" not in (left / ".git/config").read_text().lower()  # nothing written into git config

    entry = artifacts.load(artifacts.record_file(state))["qemu"]
    assert entry["subprojects"] == {
        "dtc": {"kind": "git", "url": "https://gitlab.mirror-test.invalid/dtc.git",
                "wrap_revision": "b6910bec11614980a21e46fbccc35934b671bd81", "state": "absent"},
        "keycodemapdb": {"kind": "git", "url": f"{UPSTREAM}keycodemapdb.git", "wrap_revision": sources.revision,
                         "state": "downloaded", "revision": sources.revision}}


def test_wraps_are_read_and_a_shipped_subproject_is_named_so(tmp_path):
    tree = tmp_path / "qemu-10.2.0"
    (tree / "subprojects/berkeley-softfloat-3").mkdir(parents=True)
    (tree / "subprojects/berkeley-softfloat-3/meson.build").write_text("project('softfloat')\n")
    (tree / "subprojects/berkeley-softfloat-3.wrap").write_text(
        "[wrap-git]\nurl = https://gitlab.com/qemu-project/berkeley-softfloat-3.git\n"
        "revision = b64af41c3276f97f0e181920400ee056b9c88037\npatch_directory = berkeley-softfloat-3\ndepth = 1\n")
    (tree / "subprojects/proc-macro2-1-rs.wrap").write_text(
        "[wrap-file]\ndirectory = proc-macro2-1.0.84\nsource_hash = ab12\n")
    (tree / "subprojects/packagefiles").mkdir()
    (tree / "subprojects/empty").mkdir()
    (tree / "subprojects/empty.wrap").write_text("[wrap-git]\nurl = https://e/x.git\nrevision = main\n")
    (tree / "subprojects/broken.wrap").write_text("not ini at all")
    found = subprojects.revisions(tree)
    assert found["berkeley-softfloat-3"] == {
        "kind": "git", "url": "https://gitlab.com/qemu-project/berkeley-softfloat-3.git",
        "wrap_revision": "b64af41c3276f97f0e181920400ee056b9c88037", "state": "shipped"}
    assert found["proc-macro2-1-rs"] == {"kind": "file", "source_hash": "ab12", "state": "absent"}
    assert set(found) == {"berkeley-softfloat-3", "proc-macro2-1-rs", "empty"}
    assert subprojects.empty_directories(tree) == [tree / "subprojects/empty"]
    assert subprojects.git_config_env(()) == {}


def test_only_folders_under_subprojects_are_named_and_cleared(tmp_path):
    """A wrap file is the source's text: a `directory` that leaves subprojects/ (or a
    wrap that is a FIFO) is not taken, so clearing failed downloads removes only empty
    folders under subprojects/, never a folder elsewhere."""
    tree = tmp_path / "qemu"
    (tree / "subprojects").mkdir(parents=True)
    (tree / "subprojects/good.wrap").write_text("[wrap-git]\nurl = https://example.org/good.git\n")
    (tree / "subprojects/good").mkdir()
    (tree / "subprojects/escape.wrap").write_text("[wrap-git]\ndirectory = ../../outside\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.mkfifo(tree / "subprojects/fifo.wrap")
    assert [w.name for w in subprojects.read_wraps(tree)] == ["good"]
    notes = []

    class Notes:  # the executor's one method ClearFailedDownloads uses
        note = staticmethod(notes.append)

    subprojects.ClearFailedDownloads(tree).run(Notes())
    assert not (tree / "subprojects/good").exists() and outside.is_dir()
    assert notes == [f"removed {tree / 'subprojects/good'}: empty, left by a failed download; "
                     "meson downloads it again"]
