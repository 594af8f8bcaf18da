"""The kernel as Debian packages: `make bindeb-pkg`, its .deb files recorded, `dpkg -i` to install.

No kernel is built: a tiny tree's Makefile answers `kernelrelease` and its `bindeb-pkg`
writes what Linux's does (debian/changelog, debian/arch, the .deb files next to the
tree), and the real runner records them. The prerequisites check gets a PATH and a
root without the tools, as in test_build_prereqs.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
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

MAKEFILE = """kernelrelease:
\t@echo 6.18.0$(LOCALVERSION)

bindeb-pkg:
\tmkdir -p debian arch/x86/boot
\techo amd64 > debian/arch
\tprintf 'linux-upstream (6.18.0$(LOCALVERSION)-3) unstable; urgency=low\\n' > debian/changelog
\techo bzImage > arch/x86/boot/bzImage
\tfor p in linux-image-6.18.0$(LOCALVERSION) linux-headers-6.18.0$(LOCALVERSION) linux-libc-dev; do \\
\t\techo "$$p" > ../$${p}_6.18.0$(LOCALVERSION)-3_amd64.deb; done
"""


def kernel_manifest(base: Path, extra: str = "") -> Path:
    repo = base / "linux"
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "master")
    commit(repo, {"Makefile": MAKEFILE}, "linux")
    git(repo, "tag", "v6.18")
    file = base / "m.toml"
    file.write_text(f'[kernel]\nurl = "{repo}"\nref = "v6.18"\n{extra}[kernel.config]\nbase = "defconfig"\n')
    return file


def cli(*args):
    result = CliRunner().invoke(TdxvirtGroup(name="tdxvirt", commands={"build": build}),
                                ["build", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_deb_plans_bindeb_pkg_and_dpkg_install(tmp_path, state):
    file = kernel_manifest(tmp_path)
    workdir = tmp_path / "work"
    plan = cli("plan", "kernel", "--manifest", file, "--workdir", workdir, "-j", 4, "--deb", "--install",
               "--all", "--json")
    assert plan.exit_code == 0, plan.output
    data = json.loads(plan.output)
    commands = {s["step"]: s["commands"] for s in data["steps"]}
    assert commands["build"] == [f"$ cd {workdir}/src/kernel && make -j4 bindeb-pkg LOCALVERSION=-tdxvirt"]
    assert commands["install"] == [f"$ cd {workdir}/src/kernel && dpkg -i "
                                   f"'{workdir}/src/linux-image-<release>_<version>_<arch>.deb' "
                                   f"'{workdir}/src/linux-headers-<release>_<version>_<arch>.deb'"]
    assert [s["needs_root"] for s in data["steps"] if s["step"] == "install"] == [True]
    assert data["artifacts"]["kernel linux-libc-dev.deb"] == f"{workdir}/src/linux-libc-dev_<version>_<arch>.deb"

    # the manifest says the same, with its own release suffix
    loaded = manifests.load(kernel_manifest(tmp_path / "m2", 'package = "deb"\nlocalversion = "-tdx"\n'))
    ctx = steps.Context(loaded, workdir, 8, True, HostRoot("/"))
    planned = steps.plan(loaded, ("kernel",), True)
    build_step = next(s for s in planned if s.name == "build")
    assert [a.argv for a in build_step.actions(ctx)] == [("make", "-j8", "bindeb-pkg", "LOCALVERSION=-tdx")]
    assert build_step.inputs(ctx) == {"package": "deb", "localversion": "-tdx"}
    # without it: the loose build, keyed as before (its stamps stay valid)
    loose = manifests.load(file)
    loose_build = next(s for s in steps.plan(loose, ("kernel",), True) if s.name == "build")
    assert [a.argv for a in loose_build.actions(ctx)] == [("make", "-j8"), ("make", "-j8", "modules")]
    assert loose_build.inputs(ctx) == {}


@pytest.mark.parametrize(("extra", "error"), [
    ('package = "rpm"\n', "kernel.package: 'rpm': use 'deb' (Debian packages), or leave it out"),
    ('localversion = "Tdx"\n', "kernel.localversion: 'Tdx': start with '-', '+' or '.'"),
    ('localversion = "-a b"\n', "kernel.localversion: '-a b': start with '-', '+' or '.'"),
])
def test_bad_package_fields_are_one_line_errors(tmp_path, extra, error):
    with pytest.raises(Exception, match=re.escape(error)):
        manifests.load(kernel_manifest(tmp_path, extra))


def _bin(base: Path, names) -> Path:
    folder = base / "bin"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).symlink_to(shutil.which(name) or "/bin/true")
    return folder


def _headers(root: Path, extra=()) -> Path:
    for header in ("libelf.h", "openssl/ssl.h", *extra):
        (root / "usr/include" / header).parent.mkdir(parents=True, exist_ok=True)
        (root / "usr/include" / header).write_text("")
    return root


KERNEL_TOOLS = ("git", "gcc", "make", "flex", "bison", "bc", "perl")


def test_missing_package_tools_are_named_with_debian_packages(tmp_path):
    loaded = manifests.with_kernel_package(manifests.load(kernel_manifest(tmp_path)), "deb")
    planned = steps.plan(loaded, ("kernel",), False)
    toolbox = prereqs.Toolbox(root=_headers(tmp_path / "root"),
                              search_path=str(_bin(tmp_path / "some", KERNEL_TOOLS)))
    missing = prereqs.missing(planned, toolbox)
    # what Linux 7.x's mkdebian lists as Build-Depends, which dpkg-buildpackage checks
    assert [n.name for n in missing.by_component["kernel"]] == [
        "dpkg-buildpackage", "dh", "python3", "rsync", "kmod", "cpio", "elfutils/libdw.h"]
    assert missing.install_command() == "apt-get install cpio debhelper dpkg-dev kmod libdw-dev python3 rsync"
    # the loose build needs none of them
    assert prereqs.missing(steps.plan(manifests.load(kernel_manifest(tmp_path / "loose")), ("kernel",), False),
                           toolbox).by_component == {}


def test_the_built_debs_are_recorded_with_digests_and_dpkg_installs_them(tmp_path, state):
    loaded = manifests.with_kernel_package(manifests.load(kernel_manifest(tmp_path)), "deb")
    workdir = tmp_path / "work"
    toolbox = prereqs.Toolbox(root=_headers(tmp_path / "root", ("elfutils/libdw.h",)),
                              search_path=str(_bin(tmp_path / "all", KERNEL_TOOLS + (
                                  "dpkg-buildpackage", "dh", "python3", "rsync", "kmod", "cpio"))))
    ctx = steps.Context(loaded, workdir, 2, False, HostRoot("/"), toolbox)
    planned = [s for s in steps.plan(loaded, ("kernel",), False) if s.name != "configure"]  # no Kconfig here
    src = workdir / "src"
    src.mkdir(parents=True)
    older = src / "linux-image-6.18.0-tdxvirt_6.18.0-tdxvirt-2_amd64.deb"  # an earlier build's: not this one
    older.write_text("older\n")
    record = artifacts.record_file(state)
    runner.run(planned, ctx, progress.ConsoleReporter(io.StringIO(), live=False), record)

    entry = artifacts.load(record)["kernel"]
    image = src / "linux-image-6.18.0-tdxvirt_6.18.0-tdxvirt-3_amd64.deb"
    headers = src / "linux-headers-6.18.0-tdxvirt_6.18.0-tdxvirt-3_amd64.deb"
    libc = src / "linux-libc-dev_6.18.0-tdxvirt-3_amd64.deb"
    assert entry["release"] == "6.18.0-tdxvirt"
    assert entry["artifacts"] == {"bzImage": str(src / "kernel/arch/x86/boot/bzImage"),
                                  "linux-image.deb": str(image), "linux-headers.deb": str(headers),
                                  "linux-libc-dev.deb": str(libc)}
    assert entry["digests"]["linux-image.deb"] == {"sha256": hashlib.sha256(image.read_bytes()).hexdigest(),
                                                   "size": image.stat().st_size}
    status = cli("status")
    assert str(headers) in status.output
    assert "NOT AS BUILT" not in status.output

    install = steps.KernelInstall(deb=True)
    assert [a.argv for a in install.actions(ctx)] == [("dpkg", "-i", str(image), str(headers))]
    assert install.results(ctx) == {"vmlinuz": "/boot/vmlinuz-6.18.0-tdxvirt",
                                    "modules_dir": "/lib/modules/6.18.0-tdxvirt"}
    # a .deb removed after the build: the build step is no longer done
    build_step = next(s for s in planned if s.name == "build")
    assert build_step.valid(ctx, ctx.stamps.load("kernel.build"))
    libc.unlink()
    assert not build_step.valid(ctx, ctx.stamps.load("kernel.build"))


def test_a_distribution_config_file_is_where_the_kernel_config_starts(tmp_path):
    """`base = FILE` (a distribution's config, as `current` takes /boot/config-$(uname -r)):
    copied to .config before anything else, and its digest keys the step."""
    config = tmp_path / "config-6.12.48-amd64"
    config.write_text("CONFIG_KVM=m\nCONFIG_VFIO=m\n")
    file = kernel_manifest(tmp_path).read_text().replace('base = "defconfig"', f'base = "{config}"')
    (tmp_path / "m.toml").write_text(file)
    loaded = manifests.load(tmp_path / "m.toml")
    ctx = steps.Context(loaded, tmp_path / "w", 2, False, HostRoot(tmp_path / "no-such-root"))
    configure = steps.KernelConfigure()
    assert configure.base_file(ctx) == config
    assert configure.actions(ctx)[0].show() == [f"copy {config} -> {tmp_path}/w/src/kernel/.config"]
    first = configure.inputs(ctx)
    assert first["base"] == str(config) and first["base_sha256"] == hashlib.sha256(config.read_bytes()).hexdigest()
    config.write_text("CONFIG_KVM=y\n")  # the distribution's next config: the step is redone
    assert configure.inputs(ctx)["base_sha256"] != first["base_sha256"]
