"""The plan: the steps of each component, what they run, what keys them.

Per component: fetch (clone or update), patch (``git am --empty=drop``), configure,
build and, with ``--install``, install. Repositories that only supply patch sets
(Intel's tdx-linux) are fetched first. Each step knows its actions (shown by
``plan``, run by the runner), its inputs (what its stamp key is made of), the files
that must exist for it to count as done, and what it found out (``results``).

Layout under the work directory: ``src/<name>`` trees, ``stamps/``, ``logs/``.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from . import COMPONENTS, BuildFailedError, digests, edk2, gitops, kconfig, prereqs, source, subprojects
from .actions import Command, CopyFile, WriteFile
from .manifest import Manifest, PatchSet, Repo
from .stamps import StampStore, file_digest


class NotYetKnown(Exception):
    """An input exists only after an earlier step ran (a tree not fetched yet)."""


@dataclass
class Context:
    manifest: Manifest
    workdir: Path
    jobs: int
    install: bool
    host: object  # tdxvirt.host.HostRoot: where /boot/config-* is read
    # where the build's programs and headers are (this machine's PATH and /)
    toolbox: prereqs.Toolbox = field(default_factory=prereqs.Toolbox)
    # where --install puts QEMU: / or another system's root (make install DESTDIR=root)
    root: Path = Path("/")

    @property
    def stamps(self) -> StampStore:
        return StampStore(self.workdir / "stamps")

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    def tree(self, name: str) -> Path:
        return self.workdir / "src" / name


class Step:
    component = ""
    name = ""
    needs_root = False

    @property
    def id(self) -> str:
        return f"{self.component}.{self.name}"

    @property
    def label(self) -> str:
        return f"{self.component} {self.name}"

    def actions(self, ctx: Context) -> list:
        raise NotImplementedError

    def inputs(self, ctx: Context) -> dict:
        return {}

    def outputs(self, ctx: Context) -> list[Path]:
        return []

    def results(self, ctx: Context) -> dict:
        return {}

    def valid(self, ctx: Context, stamp) -> bool:
        """Whether what the step made (per its stamp) is still there."""
        return all(path.exists() for path in self.outputs(ctx))


class Fetch(Step):
    name = "fetch"

    def __init__(self, repo: Repo):
        self.repo = repo
        self.component = repo.name

    def actions(self, ctx):
        return gitops.fetch_commands(self.repo, ctx.tree(self.repo.name), ctx.manifest.mirrors)

    def inputs(self, ctx):
        submodules = self.repo.submodules
        inputs = {"url": self.repo.url, "ref": self.repo.ref, "depth": self.repo.depth,
                  "submodules": list(submodules) if isinstance(submodules, tuple) else submodules}
        # a local source says what its ref is now: a moved tag or branch refetches. A
        # remote one is asked only with --update (no network on a run with nothing to do)
        now = gitops.source_revision(self.repo.url, self.repo.ref, ctx.manifest.mirrors)
        if now is not None:
            inputs["source_revision"] = now
        return inputs

    def outputs(self, ctx):
        return [ctx.tree(self.repo.name) / ".git"]

    def results(self, ctx):
        return {"revision": gitops.revision(ctx.tree(self.repo.name), gitops.BASE_REF)}

    def valid(self, ctx, stamp):
        tree = ctx.tree(self.repo.name)
        return (tree / ".git").exists() and gitops.revision(tree, gitops.BASE_REF) == stamp.results.get("revision")


class SourceImport(Step):
    """The fetch step of a component built from ``--source PATH`` (see ``source``)."""

    name = "fetch"

    def __init__(self, component: str, path: Path):
        self.component = component
        self.path = path

    @property
    def label(self) -> str:
        return f"{self.component} source"

    def actions(self, ctx):
        return [source.ImportSource(self.path, ctx.tree(self.component))]

    def inputs(self, ctx):
        return {"source": source.describe(self.path)}

    def outputs(self, ctx):
        return [ctx.tree(self.component) / ".git"]

    def results(self, ctx):
        tree = ctx.tree(self.component)
        return {"revision": gitops.revision(tree, gitops.BASE_REF),
                "source": {**source.describe(self.path), "git_tree": gitops.revision_tree(tree)}}

    def valid(self, ctx, stamp):
        tree = ctx.tree(self.component)
        return (tree / ".git").exists() and gitops.revision(tree, gitops.BASE_REF) == stamp.results.get("revision")


def resolve_patches(ctx: Context, patchset: PatchSet) -> list[Path]:
    """The mbox files of a patch set, in name order (NotYetKnown before the fetch)."""
    tree = ctx.tree(patchset.repo)
    if not (tree / ".git").exists():
        raise NotYetKnown(f"{patchset.repo} is not fetched yet")
    files = sorted(path for path in tree.glob(patchset.glob) if path.is_file())
    if not files:
        raise BuildFailedError(f"patch set {patchset.glob!r} matches no file in {tree} "
                               f"({patchset.repo} at {ctx.manifest.repos[patchset.repo].ref}); "
                               "fix the glob in the manifest")
    return files


class Patch(Step):
    name = "patch"

    def __init__(self, component: str, patches: tuple[PatchSet, ...]):
        self.component = component
        self.patches = patches

    def mboxes(self, ctx) -> list[Path]:
        return [path for patchset in self.patches for path in resolve_patches(ctx, patchset)]

    def actions(self, ctx):
        tree = ctx.tree(self.component)
        actions: list = [gitops.reset_to_base(tree)]
        for patchset in self.patches:
            try:
                files = resolve_patches(ctx, patchset)
            except NotYetKnown:  # plan before the fetch: show the glob itself
                files = [ctx.tree(patchset.repo) / patchset.glob]
            actions += [gitops.ApplyMbox(tree, path) for path in files]
        return actions

    def inputs(self, ctx):
        base = ctx.stamps.results(f"{self.component}.fetch").get("revision")
        if base is None:
            raise NotYetKnown(f"{self.component} is not fetched yet")
        mboxes = self.mboxes(ctx)
        return {"base": base, "patches": [[path.name, file_digest(path)] for path in mboxes]}

    def valid(self, ctx, stamp):
        # the tree still holds the patched commit (a new fetch resets it)
        return gitops.revision(ctx.tree(self.component)) == stamp.results.get("revision")

    def results(self, ctx):
        tree = ctx.tree(self.component)
        return {"revision": gitops.revision(tree),
                "applied": gitops.count_commits(tree, gitops.BASE_REF),
                "patches": [path.name for path in self.mboxes(ctx)]}


def _make(tree: Path, *args: str) -> Command:
    return Command(("make", *args), tree)


class KernelConfigure(Step):
    component, name = "kernel", "configure"

    def base_file(self, ctx) -> Path | None:
        """The config to start from; None means ``make defconfig``."""
        base = ctx.manifest.kernel.config.base
        if base == "defconfig":
            return None
        if base == "current":
            release = ctx.host.read_value("/proc/sys/kernel/osrelease")
            path = ctx.host.path(f"/boot/config-{release}") if release else None
            return path if path is not None and path.is_file() else None
        return Path(base)

    def actions(self, ctx):
        tree, config = ctx.tree("kernel"), ctx.manifest.kernel.config
        base = self.base_file(ctx)
        actions: list = [CopyFile(base, tree / ".config") if base else _make(tree, "defconfig")]
        foreign_keys = kconfig.distribution_key_files(base) if base else []
        if foreign_keys:  # the distribution's own key files: not in this tree
            actions.append(Command(tuple(kconfig.clear_strings_argv(".config", foreign_keys)), tree))
        if config.enable or config.module or config.disable:
            argv = kconfig.scripts_config_argv(".config", config.enable, config.module, config.disable)
            actions.append(Command(tuple(argv), tree))
        actions += [_make(tree, "olddefconfig"), VerifyKconfig(tree, config)]
        return actions

    def inputs(self, ctx):
        config = ctx.manifest.kernel.config
        base = self.base_file(ctx)
        return {"base": str(base) if base else "defconfig",
                "base_sha256": file_digest(base) if base else None,
                "enable": list(config.enable), "module": list(config.module),
                "disable": list(config.disable)}

    def outputs(self, ctx):
        return [ctx.tree("kernel") / ".config"]


@dataclass(frozen=True)
class VerifyKconfig:
    tree: Path
    config: object  # manifest.KernelConfig

    def show(self) -> list[str]:
        wanted = [f"{n}={kconfig.WANTED[state]}" for state in ("enable", "module", "disable")
                  for n in getattr(self.config, state)]
        return [f"verify .config: {' '.join(wanted) or 'nothing requested'}"]

    def run(self, executor) -> None:
        values = kconfig.verify(self.tree, self.tree / ".config", self.config.enable,
                                self.config.module, self.config.disable)
        executor.note("kept as asked: " + " ".join(f"{k}={v}" for k, v in values.items()))


class KernelBuild(Step):
    """``make`` and ``make modules``; or, with ``deb`` (the manifest's kernel.package),
    ``make bindeb-pkg``: the same build, packed into .deb files next to the tree."""

    component, name = "kernel", "build"

    def __init__(self, deb: bool = False):
        self.deb = deb

    def actions(self, ctx):
        tree = ctx.tree("kernel")
        if self.deb:
            return [_make(tree, f"-j{ctx.jobs}", "bindeb-pkg", *_localversion(ctx))]
        return [_make(tree, f"-j{ctx.jobs}"), _make(tree, f"-j{ctx.jobs}", "modules")]

    def inputs(self, ctx):
        # nothing for the loose build: stamps made before packages existed stay valid
        return {"package": "deb", "localversion": ctx.manifest.kernel.localversion} if self.deb else {}

    def outputs(self, ctx):
        return [ctx.tree("kernel") / "arch/x86/boot/bzImage"]

    def results(self, ctx):
        tree = ctx.tree("kernel")
        release = kernel_release(tree, *(_localversion(ctx) if self.deb else ()))
        if not self.deb:
            return {"release": release}
        return {"release": release, "debs": built_debs(tree, release) if release else {}}

    def valid(self, ctx, stamp):
        debs = stamp.results.get("debs") or {}
        return super().valid(ctx, stamp) and all(os.path.isfile(path) for path in debs.values())


def _localversion(ctx: Context) -> tuple[str, ...]:
    return (f"LOCALVERSION={ctx.manifest.kernel.localversion}",)


def kernel_release(tree: Path, *variables: str) -> str | None:
    result = subprocess.run(["make", "-s", "--no-print-directory", "kernelrelease", *variables], cwd=tree,
                            capture_output=True, text=True, check=False)
    lines = result.stdout.strip().splitlines()
    return lines[-1] if result.returncode == 0 and lines else None


# the packages of Linux's scripts/package/mkdebian; `--install` installs the first two
# (linux-libc-dev would replace the distribution's, which its C library is built with)
DEB_PACKAGES = ("linux-image", "linux-headers", "linux-libc-dev", "linux-image-dbg")
DEB_INSTALLED = DEB_PACKAGES[:2]
_CHANGELOG_HEAD = re.compile(r"\S+ \(([0-9][A-Za-z0-9.+~:-]*)\)")


def _head(path: Path, limit: int = 4096) -> str:
    """The start of a small file the package build wrote (bounded, regular files only)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            return ""
        return file.read(limit).decode(errors="replace")


def built_debs(tree: Path, release: str) -> dict[str, str]:
    """The .deb files ``make bindeb-pkg`` made for ``release``, by package.

    dpkg-buildpackage writes them next to the tree, each named
    ``<package>_<version>_<arch>.deb``; this build's version and architecture are the
    first line of the debian/changelog and debian/arch it generated, so an older
    build's files there are not taken for this one's."""
    match = _CHANGELOG_HEAD.match(_head(tree / "debian/changelog"))
    arch = _head(tree / "debian/arch", 64).strip()
    if match is None or not re.fullmatch(r"[a-z0-9-]+", arch):
        return {}
    names = {"linux-image": f"linux-image-{release}", "linux-headers": f"linux-headers-{release}",
             "linux-libc-dev": "linux-libc-dev", "linux-image-dbg": f"linux-image-{release}-dbg"}
    found = {}
    for package in DEB_PACKAGES:
        path = tree.parent / f"{names[package]}_{match[1]}_{arch}.deb"
        if path.is_file():
            found[package] = str(path)
    return found


class KernelInstall(Step):
    component, name, needs_root = "kernel", "install", True

    def __init__(self, deb: bool = False):
        self.deb = deb

    def actions(self, ctx):
        tree = ctx.tree("kernel")
        if self.deb:
            debs = ctx.stamps.results("kernel.build").get("debs") or {}
            # before the build the names are not known yet: the plan shows their pattern
            files = [debs.get(p) or f"{tree.parent}/{p}-<release>_<version>_<arch>.deb" for p in DEB_INSTALLED]
            return [Command(("dpkg", "-i", *files), tree)]
        return [_make(tree, "modules_install"), _make(tree, "install")]

    def results(self, ctx):
        release = ctx.stamps.results("kernel.build").get("release")
        return {"vmlinuz": f"/boot/vmlinuz-{release}", "modules_dir": f"/lib/modules/{release}"} if release else {}


class QemuConfigure(Step):
    component, name = "qemu", "configure"

    def actions(self, ctx):
        tree = ctx.tree("qemu")
        # meson downloads missing subprojects with git: the mirrors reach it through the
        # environment of configure only
        return [subprojects.ClearFailedDownloads(tree),
                Command(("./configure", *ctx.manifest.qemu.configure), tree,
                        subprojects.git_config_env(ctx.manifest.mirrors))]

    def inputs(self, ctx):
        return {"configure": list(ctx.manifest.qemu.configure)}

    def outputs(self, ctx):
        return [ctx.tree("qemu") / "build"]

    def results(self, ctx):
        return {"subprojects": subprojects.revisions(ctx.tree("qemu"))}


class QemuBuild(Step):
    component, name = "qemu", "build"

    def actions(self, ctx):
        return [_make(ctx.tree("qemu"), f"-j{ctx.jobs}")]

    def outputs(self, ctx):
        return [qemu_binary(ctx)]


def qemu_binary(ctx: Context) -> Path:
    return ctx.tree("qemu") / "build" / "qemu-system-x86_64"


def qemu_prefix(flags: tuple[str, ...]) -> str:
    """The --prefix QEMU's configure was given (its default: /usr/local)."""
    prefix = "/usr/local"
    for i, flag in enumerate(flags):
        if flag.startswith("--prefix="):
            prefix = flag.split("=", 1)[1]
        elif flag == "--prefix" and i + 1 < len(flags):
            prefix = flags[i + 1]
    return prefix


class QemuInstall(Step):
    """``make install``; below another root (``--root``) with ``DESTDIR``, so the binary
    keeps the paths it was configured with (its data files, its firmware path) as that
    system sees them. Such a copy is recorded as ``installed_in_root``, never as
    ``installed``: define names ``installed`` as the emulator, a path on this machine."""

    component, name, needs_root = "qemu", "install", True

    def actions(self, ctx):
        below = [f"DESTDIR={ctx.root}"] if below_root(ctx) else []
        return [_make(ctx.tree("qemu"), "install", *below)]

    def inputs(self, ctx):
        return {"root": str(ctx.root)} if below_root(ctx) else {}

    def outputs(self, ctx):
        return [Path(next(iter(self.results(ctx).values())))]

    def results(self, ctx):
        path = f"{qemu_prefix(ctx.manifest.qemu.configure)}/bin/qemu-system-x86_64"
        if below_root(ctx):
            return {"installed_in_root": str(ctx.root / path.lstrip("/"))}
        return {"installed": path}


def below_root(ctx: Context) -> bool:
    return ctx.root != Path("/")


def check_install_root(components: tuple[str, ...], install: bool, root: Path) -> None:
    """``--root``: an existing folder, and QEMU only; a kernel's ``make install`` runs
    this machine's installkernel hooks (initramfs, boot loader), which another root's
    /boot is not theirs to write."""
    from ..errors import InputError

    if root == Path("/"):
        return
    if not install:
        raise InputError(f"--root {root}: only --install uses it; add --install or drop --root")
    if not root.is_dir():
        raise InputError(f"--root {root}: not a folder; give the root of the system to install into")
    if "kernel" in components:
        raise InputError(f"--root {root}: only QEMU installs below another root; build the kernel "
                         "with --deb and install its packages there, or run `tdxvirt build run qemu`")


class OvmfConfigure(Step):
    component, name = "ovmf", "configure"

    def actions(self, ctx):
        tree, ovmf = ctx.tree("ovmf"), ctx.manifest.ovmf
        needed = ovmf.repo.submodules if isinstance(ovmf.repo.submodules, tuple) else ()
        return [
            *([edk2.CheckSubmodules(tree, needed)] if needed else []),
            _make(tree, f"-j{ctx.jobs}", "-C", "BaseTools"),
            Command(("bash", "-c", edk2.EDKSETUP_ONLY, "edksetup"), tree),
            WriteFile(tree / "Conf" / "target.txt", edk2.target_txt(ovmf, ctx.jobs)),
            edk2.CheckToolchain(tree, ovmf.toolchain),
        ]

    def inputs(self, ctx):
        ovmf = ctx.manifest.ovmf
        # the thread count is left out: a different -j must not redo the build
        return {"platform": ovmf.platform, "target": ovmf.target, "arch": ovmf.arch,
                "toolchain": ovmf.toolchain}

    def outputs(self, ctx):
        return [ctx.tree("ovmf") / "Conf" / "target.txt"]


class OvmfBuild(Step):
    component, name = "ovmf", "build"

    def actions(self, ctx):
        return [Command(("bash", "-c", edk2.EDKSETUP_THEN_EXEC, "edksetup", "build", "-n", str(ctx.jobs)),
                        ctx.tree("ovmf"))]

    def outputs(self, ctx):
        path = edk2.image_path(ctx.tree("ovmf"), ctx.manifest.ovmf)
        return [path] if path else [ctx.tree("ovmf") / ctx.manifest.ovmf.platform]


_CONFIGURE = {"kernel": KernelConfigure, "qemu": QemuConfigure, "ovmf": OvmfConfigure}
_BUILD = {"kernel": KernelBuild, "qemu": QemuBuild, "ovmf": OvmfBuild}
_INSTALL = {"kernel": KernelInstall, "qemu": QemuInstall}  # OVMF.fd is used where it is built


def select(manifest: Manifest, which: str) -> tuple[str, ...]:
    """Components for ``kernel|qemu|ovmf|all``, checked against the manifest."""
    from ..errors import InputError

    if which == "all":
        return manifest.components()
    if which not in COMPONENTS:
        raise InputError(f"unknown component {which!r}: use {', '.join(COMPONENTS)} or all")
    if manifest.component(which) is None:
        raise InputError(f"manifest {manifest.path} has no [{which}] table; add one or pick "
                         f"another component ({', '.join(manifest.components())})")
    return (which,)


def plan(manifest: Manifest, components: tuple[str, ...], install: bool,
         sources: dict[str, Path] | None = None) -> list[Step]:
    """The steps; a component in ``sources`` is imported from that path, not fetched."""
    sources = sources or {}
    steps: list[Step] = []
    helpers: list[str] = []
    for name in components:
        for patchset in manifest.component(name).patches:
            if patchset.repo not in helpers:
                helpers.append(patchset.repo)
    steps += [Fetch(manifest.repos[name]) for name in helpers]
    for name in components:
        component = manifest.component(name)
        steps.append(SourceImport(name, sources[name]) if name in sources else Fetch(component.repo))
        if component.patches:
            steps.append(Patch(name, component.patches))
        deb = name == "kernel" and component.package == "deb"
        steps += [_CONFIGURE[name](), KernelBuild(deb) if deb else _BUILD[name]()]
        if install and name in _INSTALL:
            steps.append(KernelInstall(deb) if deb else _INSTALL[name]())
    return steps


def default_jobs() -> int:
    return len(os.sched_getaffinity(0)) or 1


def artifact_paths(ctx: Context, component: str) -> dict[str, str]:
    """The artifacts a component's finished steps left, by name (existing files only)."""
    stamps = ctx.stamps
    if component == "kernel":
        installed = stamps.results("kernel.install")
        paths = {"bzImage": ctx.tree("kernel") / "arch/x86/boot/bzImage",
                 "vmlinuz": installed.get("vmlinuz"), "modules_dir": installed.get("modules_dir")}
        debs = stamps.results("kernel.build").get("debs") or {}
        paths.update({f"{package}.deb": path for package, path in debs.items()})
    elif component == "qemu":
        paths = {"qemu-system-x86_64": qemu_binary(ctx),
                 "installed": stamps.results("qemu.install").get("installed"),
                 "installed_in_root": stamps.results("qemu.install").get("installed_in_root")}
    else:
        paths = {"OVMF.fd": edk2.image_path(ctx.tree("ovmf"), ctx.manifest.ovmf)}
    return {name: str(path) for name, path in paths.items() if path and os.path.exists(path)}


def artifact_digests(paths: dict[str, str], previous: dict | None, rebuilt: bool) -> dict[str, dict]:
    """Each artifact file's SHA-256 and size (folders have none).

    When no step of the component ran (``rebuilt`` false), the digests recorded before
    are kept for unchanged paths: the files were not made again, so a file replaced at
    such a path since must not become "the build's" by a run that built nothing.
    """
    previous = previous if isinstance(previous, dict) else {}
    old_paths, old_digests = previous.get("artifacts") or {}, previous.get("digests") or {}
    found = {}
    for name, path in paths.items():
        if os.path.isdir(path):
            continue
        if not rebuilt and old_paths.get(name) == path and isinstance(old_digests.get(name), dict):
            found[name] = old_digests[name]
            continue
        try:
            found[name] = digests.digest(path).to_json()
        except digests.DigestError as error:
            raise BuildFailedError(f"cannot record the {name} artifact: {error}") from None
    return found


def artifact_entry(ctx: Context, component: str, previous: dict | None = None, rebuilt: bool = True) -> dict:
    """One component's record: its artifacts, their digests and where its sources came from."""
    stamps = ctx.stamps
    repo = ctx.manifest.component(component).repo
    fetch = stamps.results(f"{component}.fetch")
    fetched = fetch.get("revision")
    patched = stamps.results(f"{component}.patch")
    paths = artifact_paths(ctx, component)
    entry = {
        "url": repo.url, "ref": repo.ref, "revision": fetched,
        "patched_revision": patched.get("revision", fetched),
        "patches": patched.get("patches", []),
        "artifacts": paths,
        "digests": artifact_digests(paths, previous, rebuilt),
        "manifest": ctx.manifest.path, "workdir": str(ctx.workdir),
    }
    mirrored = gitops.mirrored_url(repo.url, ctx.manifest.mirrors)
    if isinstance(fetch.get("source"), dict):  # built from --source: what it was, not the manifest's URL
        entry.update(url=fetch["source"]["path"], ref=f"local {fetch['source']['kind']}", source=fetch["source"])
    elif mirrored != repo.url:
        entry["fetched_from"] = mirrored  # the mirror that stood in for the URL
    if component == "qemu":
        entry["subprojects"] = stamps.results("qemu.configure").get("subprojects", {})
    if component == "kernel":
        entry["release"] = stamps.results("kernel.build").get("release")
    return entry
