"""What a build step needs on this machine, checked before any step runs.

A missing nasm, iasl or uuid.h otherwise fails an OVMF build deep inside BaseTools or
edk2's build; a missing glib fails QEMU's configure after it set up its venv. Each
need names the Debian package that provides it, so the refusal is one line ending in
the ``apt-get install`` to run. Needs are per step: fetch and patch need git only,
configure and build the component's tools and libraries, so a tree already
configured is not refused for a tool only configure used.

Programs are looked up in the build's PATH; headers under a root (``/``); libraries
QEMU's meson finds through pkg-config are asked of pkg-config (PKG_CONFIG_PATH is
honoured, as meson does).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HostNotReadyError


@dataclass(frozen=True)
class Need:
    name: str  # what is shown: "nasm", "uuid/uuid.h", "glib-2.0"
    package: str  # the Debian package providing it
    kind: str = "program"  # "program", "header" (under /usr/include) or "pkg-config"


def _programs(*pairs: str) -> tuple[Need, ...]:
    return tuple(Need(*pair.split(":")) if ":" in pair else Need(pair, pair) for pair in pairs)


GIT = _programs("git")
_KERNEL_CONFIGURE = _programs("gcc", "make", "flex", "bison")
_KERNEL_BUILD = _KERNEL_CONFIGURE + _programs("bc", "perl") + (
    Need("libelf.h", "libelf-dev", "header"), Need("openssl/ssl.h", "libssl-dev", "header"))
# `make bindeb-pkg` (Linux's scripts/Makefile.package, scripts/package/mkdebian): 6.12
# ran dpkg-buildpackage with --no-check-builddeps, 7.x lets it check the Build-Depends
# mkdebian writes (a real 7.2.8 build stopped at "Unmet build dependencies:
# debhelper-compat (= 12) libdw-dev:native"), so they are checked here, before anything
# runs: debhelper, libdw-dev, python3, rsync, kmod, cpio (bc, bison, flex, libelf-dev and
# libssl-dev are in _KERNEL_BUILD). kmod is looked for as /usr/bin/kmod: depmod is in
# /usr/sbin, not on a user's PATH on Debian.
_KERNEL_DEB = _programs("dpkg-buildpackage:dpkg-dev", "dh:debhelper", "python3", "rsync", "kmod", "cpio") + (
    Need("elfutils/libdw.h", "libdw-dev", "header"),)
_QEMU_CONFIGURE = _programs("gcc", "make", "python3", "ninja:ninja-build", "pkg-config:pkgconf") + (
    Need("glib-2.0", "libglib2.0-dev", "pkg-config"), Need("zlib", "zlib1g-dev", "pkg-config"))
_QEMU_BUILD = _programs("gcc", "make", "ninja:ninja-build")
_OVMF = _programs("gcc", "g++", "make", "python3", "nasm", "iasl:acpica-tools") + (
    Need("uuid/uuid.h", "uuid-dev", "header"),)
# QEMU configure flags that add a library, and the library. fdt=system: meson looks
# for libfdt itself (no pkg-config file), and never falls back to its dtc subproject
_QEMU_FLAG_NEEDS = {"--enable-slirp": Need("slirp", "libslirp-dev", "pkg-config"),
                    "--enable-seccomp": Need("libseccomp", "libseccomp-dev", "pkg-config"),
                    "--enable-pixman": Need("pixman-1", "libpixman-1-dev", "pkg-config"),
                    "--enable-fdt=system": Need("libfdt.h", "libfdt-dev", "header")}
# kernel options of a distribution config (the "current" base) whose build runs one more
# tool: BTF needs pahole, in-kernel headers cpio, compressed modules xz or zstd
_KERNEL_OPTION_NEEDS = (("CONFIG_DEBUG_INFO_BTF=y", Need("pahole", "dwarves")),
                        ("CONFIG_IKHEADERS=", Need("cpio", "cpio")),
                        ("CONFIG_MODULE_COMPRESS_XZ=y", Need("xz", "xz-utils")),
                        ("CONFIG_MODULE_COMPRESS_ZSTD=y", Need("zstd", "zstd")))


def kernel_config_needs(config: Path | None) -> tuple[Need, ...]:
    """The extra tools the kernel's build needs for the options ``config`` sets."""
    try:
        lines = set(config.read_text(errors="replace").splitlines()) if config else set()
    except OSError:
        return ()
    return tuple(need for option, need in _KERNEL_OPTION_NEEDS
                 if any(line.startswith(option) and not line.endswith("=n") for line in lines))


def step_needs(step, qemu_configure: tuple[str, ...] = (), kernel_config: Path | None = None) -> tuple[Need, ...]:
    """What one step (``steps.Step``) runs that must be on this machine; ``kernel_config``
    is the config the kernel's configure step starts from."""
    if step.name in ("fetch", "patch"):
        return GIT
    if step.component == "kernel":
        if step.name == "configure":
            return _KERNEL_CONFIGURE
        deb = _KERNEL_DEB if getattr(step, "deb", False) else ()
        return _KERNEL_BUILD + deb + kernel_config_needs(kernel_config)
    if step.component == "qemu":
        if step.name == "configure":
            return _QEMU_CONFIGURE + tuple(need for flag, need in _QEMU_FLAG_NEEDS.items() if flag in qemu_configure)
        return _QEMU_BUILD
    if step.component == "ovmf":
        return _OVMF
    return ()


@dataclass(frozen=True)
class Toolbox:
    """Where this machine's programs and headers are looked for."""

    root: Path = Path("/")
    search_path: str | None = None  # None: this process's PATH
    env: dict[str, str] = field(default_factory=dict)  # added for pkg-config (PKG_CONFIG_PATH)

    def has(self, need: Need) -> bool:
        if need.kind == "program":
            return shutil.which(need.name, path=self._path()) is not None
        if need.kind == "header":
            return any((self.root / include.lstrip("/") / need.name).is_file()
                       for include in ("/usr/include", "/usr/include/x86_64-linux-gnu", "/usr/local/include"))
        pkg_config = shutil.which("pkg-config", path=self._path())
        if pkg_config is None:
            return False  # pkg-config itself is named missing too
        result = subprocess.run([pkg_config, "--exists", need.name], capture_output=True, check=False,
                                env={**os.environ, **self.env})
        return result.returncode == 0

    def _path(self) -> str:
        return self.search_path if self.search_path is not None else os.environ.get("PATH", os.defpath)


@dataclass(frozen=True)
class Missing:
    by_component: dict[str, tuple[Need, ...]]  # in plan order

    @property
    def packages(self) -> list[str]:
        return sorted({need.package for needs in self.by_component.values() for need in needs})

    def install_command(self) -> str:
        return "apt-get install " + " ".join(self.packages)

    def describe(self) -> str:
        parts = "; ".join(f"{component} needs {', '.join(n.name for n in needs)}"
                          for component, needs in self.by_component.items())
        return f"missing build prerequisites: {parts}; install them (Debian/Ubuntu): {self.install_command()}"


def missing(todo_steps, toolbox: Toolbox, qemu_configure: tuple[str, ...] = (),
            kernel_config: Path | None = None) -> Missing:
    """What the steps still to run need and this machine lacks, per component."""
    found: dict[str, list[Need]] = {}
    checked: dict[Need, bool] = {}
    for step in todo_steps:
        for need in step_needs(step, qemu_configure, kernel_config):
            if need not in checked:
                checked[need] = toolbox.has(need)
            if not checked[need] and need not in found.setdefault(step.component, []):
                found[step.component].append(need)
    return Missing({component: tuple(needs) for component, needs in found.items() if needs})


class PrerequisitesMissingError(HostNotReadyError):
    """Tools or libraries a build step needs are not installed (nothing was run)."""

