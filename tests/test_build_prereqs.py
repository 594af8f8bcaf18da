"""Prerequisites: checked before any step runs, named with the Debian packages to install.

No package is installed here: the tests give the check a PATH and a root without the
tools (or with programs of those names), and pkg-config a search path without the
libraries, and run the real CLI and runner.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from gitrepo import commit, git

from tdxvirt.build import artifacts, prereqs, progress, runner, steps
from tdxvirt.build import manifest as manifests
from tdxvirt.cli import TdxvirtGroup
from tdxvirt.cli.build import build
from tdxvirt.host import HostRoot

OVMF_TOOLS = ("gcc", "g++", "make", "python3", "nasm", "iasl")


def _bin(base: Path, names) -> Path:
    """A PATH folder holding only ``names``: this machine's program where it has one,
    else an executable of that name (nasm and iasl are not installed here)."""
    folder = base / "bin"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        real = shutil.which(name)
        (folder / name).symlink_to(real if real else "/bin/true")
    return folder


def _ovmf_manifest(base: Path) -> Path:
    repo = base / "edk2"
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "master")
    commit(repo, {"OvmfPkg/IntelTdx/IntelTdxX64.dsc": "[Defines]\n  OUTPUT_DIRECTORY = Build/IntelTdx\n"}, "edk2")
    git(repo, "tag", "edk2-stable202605")
    file = base / "m.toml"
    file.write_text(f'[ovmf]\nurl = "{repo}"\nref = "edk2-stable202605"\n'
                    'platform = "OvmfPkg/IntelTdx/IntelTdxX64.dsc"\ntarget = "RELEASE"\ntoolchain = "GCC"\n')
    return file


def test_missing_ovmf_tools_are_named_with_their_packages(tmp_path):
    loaded = manifests.load(_ovmf_manifest(tmp_path))
    plan = steps.plan(loaded, ("ovmf",), False)
    bare = prereqs.Toolbox(root=tmp_path / "root", search_path=str(_bin(tmp_path / "none", [])))
    missing = prereqs.missing(plan, bare)
    assert [n.name for n in missing.by_component["ovmf"]] == ["git", *OVMF_TOOLS, "uuid/uuid.h"]
    assert missing.describe() == (
        "missing build prerequisites: ovmf needs git, gcc, g++, make, python3, nasm, iasl, uuid/uuid.h; "
        "install them (Debian/Ubuntu): apt-get install acpica-tools g++ gcc git make nasm python3 uuid-dev")

    # the same steps with every program in PATH and uuid.h under the root: nothing missing
    root = tmp_path / "full"
    (root / "usr/include/uuid").mkdir(parents=True)
    (root / "usr/include/uuid/uuid.h").write_text("/* uuid */\n")
    full = prereqs.Toolbox(root=root, search_path=str(_bin(tmp_path / "all", ["git", *OVMF_TOOLS])))
    assert prereqs.missing(plan, full).by_component == {}
    # a step already done needs nothing: only the fetch left needs only git
    assert prereqs.missing([plan[0]], bare).describe().startswith("missing build prerequisites: ovmf needs git; ")


def test_qemu_libraries_are_asked_of_pkg_config(tmp_path):
    tools = _bin(tmp_path, ["gcc", "make", "python3", "ninja", "pkg-config", "git"])
    empty = tmp_path / "no-pc"
    empty.mkdir()
    # PKG_CONFIG_LIBDIR replaces pkg-config's own search path: no library is found
    toolbox = prereqs.Toolbox(search_path=str(tools), env={"PKG_CONFIG_LIBDIR": str(empty), "PKG_CONFIG_PATH": ""})
    configure = steps.QemuConfigure()
    missing = prereqs.missing([configure], toolbox, ("--enable-slirp", "--enable-kvm"))
    assert [n.name for n in missing.by_component["qemu"]] == ["glib-2.0", "zlib", "slirp"]
    assert missing.install_command() == "apt-get install libglib2.0-dev libslirp-dev zlib1g-dev"
    (empty / "glib-2.0.pc").write_text("Name: glib\nDescription: glib\nVersion: 2.80\n")
    assert [n.name for n in prereqs.missing([configure], toolbox).by_component["qemu"]] == ["zlib"]


def test_qemu_flags_that_add_a_library_name_its_package(tmp_path):
    # the flags Debian forky's QEMU 10.2.2 was built with for the simulated host's root:
    # each library is named before configure runs, not by meson's error minutes in
    tools = _bin(tmp_path, ["gcc", "make", "python3", "ninja", "pkg-config"])
    empty = tmp_path / "no-pc"
    empty.mkdir()
    for name in ("glib-2.0", "zlib"):
        (empty / f"{name}.pc").write_text(f"Name: {name}\nDescription: {name}\nVersion: 99\n")
    toolbox = prereqs.Toolbox(root=tmp_path / "root", search_path=str(tools),
                              env={"PKG_CONFIG_LIBDIR": str(empty), "PKG_CONFIG_PATH": ""})
    flags = ("--enable-kvm", "--enable-seccomp", "--enable-fdt=system", "--enable-pixman", "--disable-capstone")
    missing = prereqs.missing([steps.QemuConfigure()], toolbox, flags)
    assert [n.name for n in missing.by_component["qemu"]] == ["libseccomp", "pixman-1", "libfdt.h"]
    assert missing.install_command() == "apt-get install libfdt-dev libpixman-1-dev libseccomp-dev"
    (tmp_path / "root/usr/include").mkdir(parents=True)
    (tmp_path / "root/usr/include/libfdt.h").write_text("/* libfdt */\n")
    for name in ("libseccomp", "pixman-1"):
        (empty / f"{name}.pc").write_text(f"Name: {name}\nDescription: {name}\nVersion: 99\n")
    assert prereqs.missing([steps.QemuConfigure()], toolbox, flags).by_component == {}


def test_the_runner_refuses_before_creating_anything(tmp_path):
    loaded = manifests.load(_ovmf_manifest(tmp_path))
    workdir, state = tmp_path / "work", tmp_path / "state"
    bare = prereqs.Toolbox(root=tmp_path / "root", search_path=str(_bin(tmp_path / "only-git", ["git"])))
    ctx = steps.Context(loaded, workdir, jobs=1, install=False, host=HostRoot("/"), toolbox=bare)
    with pytest.raises(prereqs.PrerequisitesMissingError) as caught:
        runner.run(steps.plan(loaded, ("ovmf",), False), ctx, progress.ConsoleReporter(io.StringIO(), live=False),
                   artifacts.record_file(state))
    assert str(caught.value).startswith("missing build prerequisites: ovmf needs gcc, g++, make, python3, nasm, ")
    assert str(caught.value).endswith("apt-get install acpica-tools g++ gcc make nasm python3 uuid-dev; nothing was run")
    assert not workdir.exists() and not state.exists()


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("TDXVIRT_STATE_DIR", str(tmp_path / "state"))
    # a PATH with git only: the build tools are "not installed"
    monkeypatch.setenv("PATH", str(_bin(tmp_path / "git-only", ["git"])))
    group = TdxvirtGroup(name="tdxvirt", commands={"build": build})
    return lambda *args: CliRunner().invoke(group, ["build", *map(str, args)])


def test_run_and_dry_run_name_the_missing_prerequisites(tmp_path, cli):
    manifest, workdir = _ovmf_manifest(tmp_path), tmp_path / "work"
    has_uuid = os.path.isfile("/usr/include/uuid/uuid.h")  # the CLI checks this machine's /
    packages = "acpica-tools g++ gcc make nasm python3" + ("" if has_uuid else " uuid-dev")

    dry = cli("run", "ovmf", "--all", "--manifest", manifest, "--workdir", workdir, "--dry-run")
    assert dry.exit_code == 0, dry.output
    line = next(line for line in dry.output.splitlines() if line.startswith("Prerequisites: "))
    assert line.startswith("Prerequisites: missing build prerequisites: ovmf needs gcc, g++, make, python3, nasm, iasl")
    assert line.endswith(f"apt-get install {packages}")
    plan = cli("plan", "ovmf", "--all", "--manifest", manifest, "--workdir", workdir, "--json")
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.output)["prerequisites"]["install"] == f"apt-get install {packages}"

    result = cli("run", "ovmf", "--all", "--manifest", manifest, "--workdir", workdir)
    assert result.exit_code == 1
    error = result.stderr.strip()
    assert error.splitlines() == [f"tdxvirt: error: {line.removeprefix('Prerequisites: ')}; nothing was run"]
    assert not workdir.exists() and not (tmp_path / "state").exists()


def test_a_distribution_config_adds_the_tools_its_options_need(tmp_path):
    """Debian's config has BTF, in-kernel headers and xz-compressed modules: the kernel
    build then runs pahole, cpio and xz, which a bare build machine lacks."""
    release = "6.12.48-amd64"
    root = tmp_path / "root"
    (root / "proc/sys/kernel").mkdir(parents=True)
    (root / "proc/sys/kernel/osrelease").write_text(release + "\n")
    (root / "boot").mkdir()
    (root / f"boot/config-{release}").write_text(
        "CONFIG_DEBUG_INFO_BTF=y\nCONFIG_IKHEADERS=m\nCONFIG_MODULE_COMPRESS_XZ=y\n# CONFIG_MODULE_COMPRESS_ZSTD is not set\n")
    kernel = tmp_path / "linux"
    kernel.mkdir()
    git(kernel, "init", "-q", "-b", "master")
    commit(kernel, {"Makefile": "all:\n"}, "linux")
    file = tmp_path / "k.toml"
    file.write_text(f'[kernel]\nurl = "{kernel}"\nref = "master"\n[kernel.config]\nbase = "current"\n')
    loaded = manifests.load(file)
    bare = prereqs.Toolbox(root=tmp_path / "empty", search_path=str(_bin(tmp_path / "none", [])))
    ctx = steps.Context(loaded, tmp_path / "work", jobs=1, install=False, host=HostRoot(root), toolbox=bare)
    build_step = next(s for s in steps.plan(loaded, ("kernel",), False) if s.name == "build")
    needs = [n.name for n in runner.missing_prerequisites([build_step], ctx).by_component["kernel"]]
    assert needs == ["gcc", "make", "flex", "bison", "bc", "perl", "libelf.h", "openssl/ssl.h", "pahole", "cpio", "xz"]
    assert runner.missing_prerequisites([build_step], ctx).install_command() == (
        "apt-get install bc bison cpio dwarves flex gcc libelf-dev libssl-dev make perl xz-utils")
    # from defconfig (no distribution config) none of the three is needed
    (root / f"boot/config-{release}").unlink()
    needs = [n.name for n in runner.missing_prerequisites([build_step], ctx).by_component["kernel"]]
    assert "pahole" not in needs and "cpio" not in needs and "xz" not in needs
