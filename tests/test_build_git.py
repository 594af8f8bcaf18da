"""Fetching and patching with real git: local repositories, real mbox patch sets.

Patch sets are made with `git format-patch` (one with an empty commit, which
`git am --empty=drop` must drop), and applied by the build's patch step; a patch
that does not apply is aborted with `git am --abort` and named with its files.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from gitrepo import GIT_ENV, commit, git  # noqa: F401

from tdxvirt.build import BuildFailedError, artifacts, gitops, progress, runner, steps
from tdxvirt.build import manifest as manifests
from tdxvirt.host import HostRoot


@pytest.fixture
def upstream(tmp_path) -> Path:
    """A "kernel" with tag v1 and branch master; patches are written against v1."""
    repo = tmp_path / "upstream" / "kvm"
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "master")
    commit(repo, {"arch/x86/kvm/vmx/tdx.c": "int tdx;\nint mode = 0;\n", "Makefile": "all:\n"}, "baseline")
    git(repo, "tag", "v1")
    return repo


def make_mbox(repo: Path, base: str, patches: list[tuple[dict[str, str], str]]) -> str:
    """format-patch of commits made on top of ``base`` (``--always`` keeps empty ones)."""
    git(repo, "checkout", "-q", "-B", "series", base)
    for files, message in patches:
        commit(repo, files, message)
    mbox = git(repo, "format-patch", "--always", "--stdout", base)
    git(repo, "checkout", "-q", "master")
    return mbox + "\n"


@pytest.fixture
def patches_repo(tmp_path) -> Path:
    repo = tmp_path / "upstream" / "tdx-linux"
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "device-passthrough")
    return repo


def add_mbox(repo: Path, name: str, text: str) -> None:
    commit(repo, {f"tdx-kvm/{name}": text}, f"add {name}")


def write_manifest(path: Path, kernel_url: str, kernel_ref: str, patches_url: str,
                   globs=("tdx-kvm/tdx_kvm_baseline_*.mbox",)) -> Path:
    patch_list = ", ".join(f'{{ repo = "tdx-linux", glob = "{glob}" }}' for glob in globs)
    path.write_text(f"""
[repos.tdx-linux]
url = "{patches_url}"
ref = "device-passthrough"

[kernel]
url = "{kernel_url}"
ref = "{kernel_ref}"
patches = [{patch_list}]
""")
    return path


def run_steps(manifest_file: Path, workdir: Path, state: Path, names=("fetch", "patch"), update=False):
    loaded = manifests.load(manifest_file)
    ctx = steps.Context(loaded, workdir, jobs=1, install=False, host=HostRoot("/"))
    chosen = [s for s in steps.plan(loaded, ("kernel",), False) if s.name in names]
    return runner.run(chosen, ctx, progress.ConsoleReporter(io.StringIO(), live=False),
                      artifacts.record_file(state), update=update)


@pytest.mark.parametrize("ref_kind", ["branch", "tag", "commit"])
def test_fetch_a_branch_tag_or_commit_from_a_local_path(upstream, patches_repo, tmp_path, ref_kind):
    add_mbox(patches_repo, "tdx_kvm_baseline_0.mbox", make_mbox(upstream, "v1", []))
    later = commit(upstream, {"Makefile": "all:\n\ttrue\n"}, "later")
    ref = {"branch": "master", "tag": "v1", "commit": later}[ref_kind]
    expected = later if ref_kind != "tag" else git(upstream, "rev-parse", "v1")
    # a relative url is relative to the manifest's folder
    manifest = write_manifest(tmp_path / "m.toml", "upstream/kvm", ref, str(patches_repo))
    workdir = tmp_path / "work"
    summary = run_steps(manifest, workdir, tmp_path / "state", names=("fetch",))
    assert summary.executed == ["tdx-linux.fetch", "kernel.fetch"]
    tree = workdir / "src/kernel"
    assert git(tree, "rev-parse", "HEAD") == expected
    assert git(tree, "rev-parse", gitops.BASE_REF) == expected
    assert git(tree, "remote", "get-url", "origin") == str(upstream)
    assert steps.Context(manifests.load(manifest), workdir, 1, False, HostRoot("/")).stamps.results(
        "kernel.fetch") == {"revision": expected}


def test_update_follows_a_moving_branch(upstream, patches_repo, tmp_path):
    add_mbox(patches_repo, "tdx_kvm_baseline_0.mbox",
             make_mbox(upstream, "v1", [({"tdx.txt": "tdx\n"}, "tdx: add tdx.txt")]))
    manifest = write_manifest(tmp_path / "m.toml", str(upstream), "master", str(patches_repo))
    workdir, state = tmp_path / "work", tmp_path / "state"
    run_steps(manifest, workdir, state)
    moved = commit(upstream, {"README": "moved on\n"}, "upstream moved")
    # a local source is asked where its branch is: no --update needed
    summary = run_steps(manifest, workdir, state)
    assert summary.executed == ["kernel.fetch", "kernel.patch"]
    assert run_steps(manifest, workdir, state).executed == []
    summary = run_steps(manifest, workdir, state, update=True)
    assert summary.executed == ["tdx-linux.fetch", "kernel.fetch"]  # nothing new: the patch is kept
    tree = workdir / "src/kernel"
    assert git(tree, "rev-parse", gitops.BASE_REF) == moved
    assert git(tree, "log", "--format=%s", "-2").splitlines() == ["tdx: add tdx.txt", "upstream moved"]


def test_patch_sets_apply_in_order_and_empty_patches_are_dropped(upstream, patches_repo, tmp_path):
    first = make_mbox(upstream, "v1", [
        ({"arch/x86/kvm/vmx/tdx.c": "int tdx;\nint mode = 1;\n"}, "KVM: TDX: mode 1"),
        ({}, "KVM: TDX: empty placeholder"),
    ])
    tip = git(upstream, "rev-parse", "series")  # the second set goes on top of the first
    second = make_mbox(upstream, tip, [({"virt/tdx.txt": "passthrough\n"}, "KVM: TDX: passthrough")])
    add_mbox(patches_repo, "tdx_kvm_baseline_aaaa.mbox", first)
    commit(patches_repo, {"tdx-kvm/extra/tdx_kvm_passthrough_bbbb.mbox": second}, "second set")
    manifest = write_manifest(tmp_path / "m.toml", str(upstream), "v1", str(patches_repo),
                              globs=("tdx-kvm/tdx_kvm_baseline_*.mbox", "tdx-kvm/extra/*.mbox"))
    assert first.count("Subject: [PATCH") == 2  # the empty commit really is in the mbox
    workdir = tmp_path / "work"
    summary = run_steps(manifest, workdir, tmp_path / "state")
    assert summary.executed == ["tdx-linux.fetch", "kernel.fetch", "kernel.patch"]
    tree = workdir / "src/kernel"
    assert git(tree, "log", "--format=%s", f"{gitops.BASE_REF}..HEAD").splitlines() == [
        "KVM: TDX: passthrough", "KVM: TDX: mode 1"]
    assert git(tree, "log", "-1", "--format=%an <%ae>", "HEAD~1") == "Test Author <author@example.org>"
    log = (workdir / "logs/kernel.patch.log").read_text()
    assert "Skipping: KVM: TDX: empty placeholder" in log
    stamp = steps.Context(manifests.load(manifest), workdir, 1, False, HostRoot("/")).stamps.results("kernel.patch")
    assert stamp["applied"] == 2
    assert stamp["patches"] == ["tdx_kvm_baseline_aaaa.mbox", "tdx_kvm_passthrough_bbbb.mbox"]
    # patching again (a new mbox) starts from the fetched commit, not from the patched tree
    add_mbox(patches_repo, "tdx_kvm_baseline_aaaa.mbox", make_mbox(upstream, "v1", [
        ({"arch/x86/kvm/vmx/tdx.c": "int tdx;\nint mode = 2;\n"}, "KVM: TDX: mode 2")]))
    summary = run_steps(manifest, workdir, tmp_path / "state", update=True)
    assert summary.executed[-1] == "kernel.patch"
    assert git(tree, "log", "--format=%s", f"{gitops.BASE_REF}..HEAD").splitlines() == [
        "KVM: TDX: passthrough", "KVM: TDX: mode 2"]


def test_a_conflicting_patch_is_aborted_cleanly_and_named(upstream, patches_repo, tmp_path):
    mbox = make_mbox(upstream, "v1", [
        ({"virt/tdx.txt": "one\n"}, "KVM: TDX: add virt/tdx.txt"),
        ({"arch/x86/kvm/vmx/tdx.c": "int tdx;\nint mode = 1;\n"}, "KVM: TDX: set mode"),
        ({"virt/more.txt": "more\n"}, "KVM: TDX: more"),
    ])
    add_mbox(patches_repo, "tdx_kvm_baseline_cafe.mbox", mbox)
    # upstream moved the line the second patch changes: it cannot apply to v2
    commit(upstream, {"arch/x86/kvm/vmx/tdx.c": "int tdx;\nint mode = 7;\n"}, "upstream change")
    git(upstream, "tag", "v2")
    manifest = write_manifest(tmp_path / "m.toml", str(upstream), "v2", str(patches_repo))
    workdir = tmp_path / "work"
    with pytest.raises(BuildFailedError) as caught:
        run_steps(manifest, workdir, tmp_path / "state")
    message = str(caught.value)
    assert message.startswith("kernel patch failed: patch 0002 KVM: TDX: set mode of "
                              "tdx_kvm_baseline_cafe.mbox does not apply to kernel "
                              "(files: arch/x86/kvm/vmx/tdx.c); git am aborted")
    assert f"full log: {workdir}/logs/kernel.patch.log" in message
    conflict = caught.value.__cause__.conflict
    assert conflict.patch == "0002 KVM: TDX: set mode"
    assert conflict.files == ("arch/x86/kvm/vmx/tdx.c",)
    tree = workdir / "src/kernel"
    # aborted cleanly: no git am in progress, nothing modified, HEAD on the fetched commit
    assert not (tree / ".git/rebase-apply").exists()
    assert git(tree, "status", "--porcelain") == ""
    assert git(tree, "rev-parse", "HEAD") == git(upstream, "rev-parse", "v2")
    assert not (tree / "virt/tdx.txt").exists()
    assert not (workdir / "stamps/kernel.patch.json").exists()
    assert (workdir / "stamps/kernel.fetch.json").exists()


def test_a_glob_matching_nothing_is_named(upstream, patches_repo, tmp_path):
    add_mbox(patches_repo, "tdx_kvm_baseline_0.mbox", make_mbox(upstream, "v1", []))
    manifest = write_manifest(tmp_path / "m.toml", str(upstream), "v1", str(patches_repo),
                              globs=("tdx-kvm/tdx_kvm_nothing_*.mbox",))
    with pytest.raises(BuildFailedError, match=r"kernel patch: patch set 'tdx-kvm/tdx_kvm_nothing_\*\.mbox' "
                                               r"matches no file in .*/src/tdx-linux"):
        run_steps(manifest, tmp_path / "work", tmp_path / "state")


def test_a_missing_upstream_fails_the_fetch_naming_the_log(upstream, patches_repo, tmp_path):
    add_mbox(patches_repo, "tdx_kvm_baseline_0.mbox", make_mbox(upstream, "v1", []))
    manifest = write_manifest(tmp_path / "m.toml", str(upstream), "no-such-branch", str(patches_repo))
    with pytest.raises(BuildFailedError) as caught:
        run_steps(manifest, tmp_path / "work", tmp_path / "state")
    message = str(caught.value)
    assert message.startswith("kernel fetch failed: `git -C ")
    assert "fetch origin no-such-branch` exited with 128" in message
    assert "couldn't find remote ref no-such-branch" in message


def test_an_mbox_git_cannot_read_is_named(upstream, patches_repo, tmp_path):
    add_mbox(patches_repo, "tdx_kvm_baseline_0.mbox", "this is not a patch\n")
    manifest = write_manifest(tmp_path / "m.toml", str(upstream), "v1", str(patches_repo))
    with pytest.raises(BuildFailedError, match=r"kernel patch failed: git am cannot apply "
                                               r".*/tdx_kvm_baseline_0\.mbox: Patch format detection "
                                               r"failed\.; nothing of it was applied"):
        run_steps(manifest, tmp_path / "work", tmp_path / "state")


def test_parse_am_failure_reads_gits_messages():
    lines = ["Applying: KVM: one", "error: patch failed: arch/x86/kvm/vmx/tdx.c:12",
             "error: arch/x86/kvm/vmx/tdx.c: patch does not apply",
             "error: include/linux/kvm.h: does not exist in index",
             "Patch failed at 0007 KVM: TDX: seven"]
    conflict = gitops.parse_am_failure(Path("/x/set.mbox"), lines)
    assert conflict.patch == "0007 KVM: TDX: seven"
    assert conflict.files == ("arch/x86/kvm/vmx/tdx.c", "include/linux/kvm.h")


def test_a_moved_tag_in_a_local_source_refetches_without_update(upstream, patches_repo, tmp_path):
    """build-smoke's case: its source repository is made again and its tag moved."""
    add_mbox(patches_repo, "tdx_kvm_baseline_0.mbox", make_mbox(upstream, "v1", []))
    manifest = write_manifest(tmp_path / "m.toml", str(upstream), "v1", str(patches_repo))
    workdir, state = tmp_path / "work", tmp_path / "state"
    run_steps(manifest, workdir, state, names=("fetch",))
    tree = workdir / "src/kernel"
    # the repository made again from scratch at the same path, the tag on a new commit
    shutil.rmtree(upstream)
    upstream.mkdir()
    git(upstream, "init", "-q", "-b", "master")
    moved = commit(upstream, {"Makefile": "all:\n\techo new tree\n"}, "the source changed")
    git(upstream, "tag", "v1")
    loaded = manifests.load(manifest)
    ctx = steps.Context(loaded, workdir, 1, False, HostRoot("/"))
    plan = [s for s in steps.plan(loaded, ("kernel",), False) if s.name == "fetch"]
    assert [s.done for s in runner.states(plan, ctx)] == [True, False]  # plan sees it too
    summary = run_steps(manifest, workdir, state, names=("fetch",))
    assert summary.executed == ["kernel.fetch"]
    assert git(tree, "rev-parse", "HEAD") == moved
    assert (tree / "Makefile").read_text() == "all:\n\techo new tree\n"
    assert run_steps(manifest, workdir, state, names=("fetch",)).executed == []


def test_a_source_revision_is_read_only_from_local_sources(upstream):
    tag = git(upstream, "rev-parse", "v1")
    assert gitops.source_revision(str(upstream), "v1") == tag
    assert gitops.source_revision(f"file://{upstream}", "master") == tag
    assert gitops.source_revision(str(upstream), tag) == tag
    assert gitops.source_revision(str(upstream), "no-such-ref") is None
    assert gitops.source_revision("https://example.org/never/asked.git", "v1") is None
