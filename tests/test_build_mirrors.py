"""Air-gapped sources: [mirrors] / --mirror for the top repository and every submodule,
and only the submodules a build needs. Real git repositories and submodules, real
`git` runs; the URLs are under .invalid, so a URL not mapped to a mirror cannot be
fetched at all (no network).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from click.testing import CliRunner
from gitrepo import commit, git

from tdxvirt.build import BuildFailedError, artifacts, gitops, progress, runner, steps
from tdxvirt.build import manifest as manifests
from tdxvirt.cli import TdxvirtGroup
from tdxvirt.cli.build import build
from tdxvirt.errors import InputError
from tdxvirt.host import HostRoot

UPSTREAM = "https://git.mirror-test.invalid/"
NEEDED = ("CryptoPkg/Library/OpensslLib/openssl", "BaseTools/Source/C/BrotliCompress/brotli")
UNNEEDED = "UnitTestFrameworkPkg/Library/GoogleTestLib/googletest"


class Mirrors:
    """A folder of mirrors as `git clone --mirror` makes them: <base>/<owner>/<name>.git,
    an edk2-like superproject whose .gitmodules name the upstream URLs."""

    def __init__(self, base: Path):
        self.folder = base / "mirrors"
        work = base / "work-repos"
        self.subs = {}
        for path, name in zip((*NEEDED, UNNEEDED), ("openssl/openssl", "google/brotli", "google/googletest")):
            repo = work / name
            repo.mkdir(parents=True)
            git(repo, "init", "-q", "-b", "master")
            self.subs[path] = commit(repo, {"README": f"{name}\n"}, name)
            self._mirror(repo, name)
        edk2 = work / "tianocore/edk2"
        edk2.mkdir(parents=True)
        git(edk2, "init", "-q", "-b", "master")
        commit(edk2, {"edksetup.sh": "# edk2\n"}, "edk2")
        for path, name in zip((*NEEDED, UNNEEDED), ("openssl/openssl", "google/brotli", "google/googletest")):
            git(edk2, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(work / name), path)
            git(edk2, "config", "-f", ".gitmodules", f"submodule.{path}.url", f"{UPSTREAM}{name}.git")
        git(edk2, "add", ".gitmodules")
        git(edk2, "commit", "-q", "-m", "submodules")
        git(edk2, "tag", "edk2-stable202605")
        self.edk2 = edk2
        self.tag = git(edk2, "rev-parse", "HEAD")
        self._mirror(edk2, "tianocore/edk2")

    def _mirror(self, repo: Path, name: str) -> None:
        target = self.folder / f"{name}.git"
        target.parent.mkdir(parents=True, exist_ok=True)
        git(repo.parent, "clone", "-q", "--mirror", str(repo), str(target))

    def manifest(self, path: Path, submodules="list", mirrors: bool = True) -> Path:
        listed = {"list": '["' + '", "'.join(NEEDED) + '"]', "all": "true"}[submodules]
        table = f'[mirrors]\n"{UPSTREAM}" = "{self.folder}/"\n' if mirrors else ""
        path.write_text(f'{table}[ovmf]\nurl = "{UPSTREAM}tianocore/edk2.git"\nref = "edk2-stable202605"\n'
                        f'submodules = {listed}\nplatform = "OvmfPkg/IntelTdx/IntelTdxX64.dsc"\n'
                        'target = "RELEASE"\ntoolchain = "GCC"\n')
        return path


@pytest.fixture
def mirrors(tmp_path) -> Mirrors:
    return Mirrors(tmp_path)


@pytest.fixture
def user_git_config(tmp_path, monkeypatch) -> Path:
    """The user's own git configuration: must never be written."""
    file = tmp_path / "home" / ".gitconfig"
    file.parent.mkdir()
    file.write_text("[user]\n\tname = Someone\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(file))
    monkeypatch.setenv("HOME", str(file.parent))
    return file


def fetch(manifest: Path, workdir: Path, state: Path, extra_mirrors=(), all_submodules=False):
    loaded = manifests.with_mirrors(manifests.load(manifest), tuple(extra_mirrors))
    loaded = manifests.with_all_submodules(loaded, all_submodules)
    ctx = steps.Context(loaded, workdir, jobs=1, install=False, host=HostRoot("/"))
    chosen = [s for s in steps.plan(loaded, ("ovmf",), False) if s.name == "fetch"]
    return runner.run(chosen, ctx, progress.ConsoleReporter(io.StringIO(), live=False),
                      artifacts.record_file(state))


def test_the_top_repository_and_the_needed_submodules_come_from_the_mirrors(mirrors, tmp_path, user_git_config):
    before = user_git_config.read_text()
    workdir, state = tmp_path / "work", tmp_path / "state"
    summary = fetch(mirrors.manifest(tmp_path / "m.toml"), workdir, state)
    assert summary.executed == ["ovmf.fetch"]
    tree = workdir / "src/ovmf"
    assert git(tree, "rev-parse", "HEAD") == mirrors.tag
    for path in NEEDED:  # checked out at the superproject's recorded commit
        assert git(tree / path, "rev-parse", "HEAD") == mirrors.subs[path]
        assert (tree / path / "README").is_file()
    assert list((tree / UNNEEDED).iterdir()) == []  # not initialised: never fetched
    # the canonical URL stays the remote's; the mapping lived on tdxvirt's command lines only
    assert git(tree, "remote", "get-url", "origin") == f"{UPSTREAM}tianocore/edk2.git"
    assert "insteadof" not in (tree / ".git/config").read_text().lower()
    assert user_git_config.read_text() == before
    log = (workdir / "logs/ovmf.fetch.log").read_text()
    assert f"-c url.{mirrors.folder}/.insteadOf={UPSTREAM} -c protocol.file.allow=always submodule update " \
           f"--init -- {' '.join(NEEDED)}" in log
    entry = artifacts.load(artifacts.record_file(state))["ovmf"]
    assert entry["url"] == f"{UPSTREAM}tianocore/edk2.git"
    assert entry["fetched_from"] == f"{mirrors.folder}/tianocore/edk2.git"
    assert entry["revision"] == mirrors.tag


def test_without_a_mirror_nothing_is_fetched_and_the_error_names_the_url(mirrors, tmp_path, user_git_config):
    with pytest.raises(BuildFailedError) as caught:
        fetch(mirrors.manifest(tmp_path / "m.toml", mirrors=False), tmp_path / "work", tmp_path / "state")
    assert str(caught.value).startswith("ovmf fetch failed: `git -C ")
    assert "git.mirror-test.invalid" in str(caught.value)


def test_a_mirror_given_with_the_option_and_every_submodule(mirrors, tmp_path, user_git_config):
    workdir = tmp_path / "work"
    manifest = mirrors.manifest(tmp_path / "m.toml", submodules="all", mirrors=False)
    fetch(manifest, workdir, tmp_path / "state", [f"{UPSTREAM}={mirrors.folder}/"])
    for path in (*NEEDED, UNNEEDED):
        assert git(workdir / "src/ovmf" / path, "rev-parse", "HEAD") == mirrors.subs[path]


def test_a_moved_tag_in_the_mirror_is_seen_without_update(mirrors, tmp_path, user_git_config):
    manifest = mirrors.manifest(tmp_path / "m.toml")
    workdir, state = tmp_path / "work", tmp_path / "state"
    fetch(manifest, workdir, state)
    moved = commit(mirrors.edk2, {"edksetup.sh": "# edk2, later\n"}, "later")
    git(mirrors.edk2, "tag", "-f", "edk2-stable202605")
    git(mirrors.folder / "tianocore/edk2.git", "fetch", "-q", "--force", str(mirrors.edk2), "+refs/tags/*:refs/tags/*")
    loaded = manifests.load(manifest)
    assert gitops.source_revision(loaded.ovmf.repo.url, "edk2-stable202605", loaded.mirrors) == moved
    assert fetch(manifest, workdir, state).executed == ["ovmf.fetch"]
    assert git(workdir / "src/ovmf", "rev-parse", "HEAD") == moved


def test_mirror_config_and_mapping():
    mirror = manifests.Mirror("https://github.com/", "/srv/mirrors/")
    inner = manifests.Mirror("https://github.com/tianocore/", "https://git.example.org/tc/")
    assert gitops.mirror_config((mirror,)) == ("-c", "url./srv/mirrors/.insteadOf=https://github.com/",
                                               "-c", "protocol.file.allow=always")
    assert gitops.mirror_config((inner,)) == ("-c", "url.https://git.example.org/tc/.insteadOf=https://github.com/tianocore/")
    assert gitops.mirror_config(()) == ()
    # the longest prefix wins, as in git
    assert gitops.mirrored_url("https://github.com/tianocore/edk2.git", (mirror, inner)) == "https://git.example.org/tc/edk2.git"
    assert gitops.mirrored_url("https://github.com/openssl/openssl", (mirror, inner)) == "/srv/mirrors/openssl/openssl"
    assert gitops.mirrored_url("https://gitlab.com/qemu-project/qemu.git", (mirror, inner)) == \
        "https://gitlab.com/qemu-project/qemu.git"


@pytest.mark.parametrize("table, message", [
    ('"https://github.com/" = "/nonexistent/mirrors/"', "'/nonexistent/mirrors/' is neither a URL nor an existing folder"),
    ('"github" = "/tmp/"', "'github' is not a URL prefix"),
    ('"https://github.com/" = 3', "expected a string (a folder of mirrors or a URL), got a number"),
    ('"https://github.com/" = "-x"', "must be non-empty, not start with '-'"),
])
def test_bad_mirror_lines_are_one_line_errors(tmp_path, table, message):
    file = tmp_path / "m.toml"
    file.write_text(f'[mirrors]\n{table}\n[qemu]\nurl = "https://e/q"\nref = "v1"\n')
    with pytest.raises(InputError) as caught:
        manifests.load(file)
    assert str(caught.value).startswith(f"manifest {file}: mirrors")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_mirror_option_in_dry_run_and_its_refusals(mirrors, tmp_path, monkeypatch, user_git_config):
    monkeypatch.setenv("TDXVIRT_STATE_DIR", str(tmp_path / "state"))
    group = TdxvirtGroup(name="tdxvirt", commands={"build": build})
    manifest = mirrors.manifest(tmp_path / "m.toml", mirrors=False)
    workdir = tmp_path / "work"
    result = CliRunner().invoke(group, ["build", "run", "ovmf", "--all", "--manifest", str(manifest), "--workdir",
                                        str(workdir), "--mirror", f"{UPSTREAM}={mirrors.folder}/", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert (f"git -C {workdir}/src/ovmf -c url.{mirrors.folder}/.insteadOf={UPSTREAM} "
            "-c protocol.file.allow=always fetch origin edk2-stable202605") in result.output
    assert (f"-c protocol.file.allow=always submodule update --init -- {' '.join(NEEDED)}") in result.output
    assert not workdir.exists()
    for bad, message in ((f"{UPSTREAM}", "use --mirror URL-PREFIX=MIRROR"),
                         (f"{UPSTREAM}=/nonexistent/", "is neither a URL nor an existing folder of mirrors")):
        refused = CliRunner().invoke(group, ["build", "plan", "ovmf", "--manifest", str(manifest), "--mirror", bad])
        assert refused.exit_code == 2
        assert refused.stderr.strip().startswith(f"tdxvirt: error: --mirror '{bad}': ")
        assert message in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_all_submodules_fetches_the_ones_the_manifest_leaves_out(mirrors, tmp_path, user_git_config):
    """`--all-submodules` on a manifest naming the build's submodules: every one is
    fetched (from the mirrors), the one the list leaves out too."""
    workdir = tmp_path / "work"
    fetch(mirrors.manifest(tmp_path / "m.toml"), workdir, tmp_path / "state", all_submodules=True)
    for path in (*NEEDED, UNNEEDED):
        assert git(workdir / "src/ovmf" / path, "rev-parse", "HEAD") == mirrors.subs[path]
    loaded = manifests.load(mirrors.manifest(tmp_path / "m.toml"))
    assert manifests.with_all_submodules(loaded, True).ovmf.repo.submodules is True
    assert manifests.with_all_submodules(loaded, False) is loaded
