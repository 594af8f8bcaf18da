"""The build manifest: a TOML file read with tomllib, every field checked.

A manifest names the git repositories (URLs or local paths/mirrors) and what to do
with them: the mbox patch sets to apply, the kernel symbols, QEMU's configure flags
and edk2's platform, target and toolchain tag. Every error names the file and the
field (``kernel.config.enable[2]``) on one line.

Two manifests ship with tdxvirt, chosen by name with ``--manifest NAME``: ``upstream``
(the default: released Linux, QEMU and edk2 with TDX, no patches) and
``intel-device-passthrough`` (the source document's 2024 stack with Intel's patch
sets). Anything else given to ``--manifest`` is a file.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

from ..errors import InputError
from . import COMPONENTS

# shipped manifests by name; files directly in this package (package data "*.toml")
SHIPPED = {"upstream": "upstream.toml", "intel-device-passthrough": "intel-device-passthrough.toml"}
DEFAULT_NAME = "upstream"
DEFAULT_MANIFEST = SHIPPED[DEFAULT_NAME]

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+|[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:\S+")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SYMBOL = re.compile(r"(?:CONFIG_)?([A-Z0-9_]+)")
_EDK2_WORD = re.compile(r"[A-Z][A-Z0-9_]*")
KERNEL_BASES = ("current", "defconfig")  # or a path to a config file
KERNEL_PACKAGES = ("deb",)
DEFAULT_LOCALVERSION = "-tdxvirt"
# appended to the kernel release, which names the Debian packages (linux-image-RELEASE):
# Debian's package names allow lower-case letters, digits, '+', '-' and '.'
_LOCALVERSION = re.compile(r"[-+.][a-z0-9+.-]{0,31}")
EDK2_TARGETS = ("DEBUG", "RELEASE", "NOOPT")


@dataclass(frozen=True)
class Repo:
    """A git tree: where it comes from and which branch, tag or commit."""

    name: str  # also its folder under <workdir>/src
    url: str  # a URL, or an absolute path to a local repository or mirror
    ref: str
    # False, True (every submodule) or the paths of the submodules the build needs
    submodules: bool | tuple[str, ...] = False
    depth: int | None = None  # a shallow fetch, when set


@dataclass(frozen=True)
class PatchSet:
    """mbox files matched by ``glob`` inside the tree of repository ``repo``."""

    repo: str
    glob: str


@dataclass(frozen=True)
class KernelConfig:
    base: str  # "current", "defconfig" or an absolute path
    enable: tuple[str, ...]  # symbols without CONFIG_, wanted =y
    module: tuple[str, ...]  # wanted =m
    disable: tuple[str, ...]  # wanted unset


@dataclass(frozen=True)
class Kernel:
    repo: Repo
    patches: tuple[PatchSet, ...]
    config: KernelConfig
    # "deb": built as Debian packages (make bindeb-pkg), installed with dpkg -i;
    # None: the loose bzImage and modules, installed with make modules_install install
    package: str | None = None
    localversion: str = DEFAULT_LOCALVERSION  # the packages' release suffix (LOCALVERSION)


@dataclass(frozen=True)
class Qemu:
    repo: Repo
    patches: tuple[PatchSet, ...]
    configure: tuple[str, ...]


@dataclass(frozen=True)
class Ovmf:
    repo: Repo
    patches: tuple[PatchSet, ...]
    platform: str  # the .dsc, relative to the edk2 tree
    target: str  # DEBUG, RELEASE, NOOPT
    arch: str
    toolchain: str  # TOOL_CHAIN_TAG


@dataclass(frozen=True)
class Mirror:
    """git's ``url.<base>.insteadOf=<prefix>``: a URL starting with ``prefix`` is fetched
    from ``base`` + the rest (``https://github.com/`` -> ``/srv/mirrors/``)."""

    prefix: str
    base: str  # a URL, or an absolute path to a folder of mirrors (kept with its trailing '/')

    @property
    def local(self) -> bool:
        return self.base.startswith("/")


@dataclass(frozen=True)
class Manifest:
    path: str  # where it was read from (for messages and the artifacts record)
    repos: dict[str, Repo]  # repositories that only supply patch sets
    kernel: Kernel | None
    qemu: Qemu | None
    ovmf: Ovmf | None
    mirrors: tuple[Mirror, ...] = ()  # [mirrors] and --mirror: for air-gapped hosts

    def component(self, name: str):
        return getattr(self, name)

    def components(self) -> tuple[str, ...]:
        return tuple(name for name in COMPONENTS if self.component(name) is not None)


def shipped_path(name: str) -> Path:
    """The file of a shipped manifest (``upstream``, ``intel-device-passthrough``)."""
    return Path(str(resources.files("tdxvirt.build").joinpath(SHIPPED[name])))


def default_manifest_path() -> Path:
    """The default manifest: the upstream TDX stack."""
    return shipped_path(DEFAULT_NAME)


def resolve(reference: str | Path | None) -> Path:
    """``--manifest``'s file: a shipped manifest's name, else a path (None: the default).

    A name wins over a file of the same name in the current folder; ``./upstream``
    names that file."""
    if reference is None:
        return default_manifest_path()
    if isinstance(reference, str) and reference in SHIPPED:
        return shipped_path(reference)
    return Path(reference)


def load(path: str | Path | None = None) -> Manifest:
    """Read and check a manifest: a file, a shipped name, or None for the default."""
    file = resolve(path)
    try:
        data = tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise InputError(f"manifest {file}: no such file; give an existing --manifest FILE "
                         f"or a shipped one by name ({', '.join(SHIPPED)})") from None
    except IsADirectoryError:
        raise InputError(f"manifest {file} is a directory; give a .toml file") from None
    except UnicodeDecodeError:
        raise InputError(f"manifest {file}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"manifest {file}: not valid TOML: {error}") from None
    except OSError as error:
        raise InputError(f"manifest {file}: cannot be read ({error.strerror})") from None
    except ValueError:  # a NUL byte in the path
        raise InputError(f"manifest {str(file)!r}: not a usable path") from None
    return _Reader(file).manifest(data)


class _Reader:
    """Typed access to the parsed TOML; every complaint names file and field."""

    def __init__(self, file: Path):
        self.file = file
        self.base = file.resolve().parent  # relative paths are relative to the manifest

    def fail(self, field: str, problem: str) -> InputError:
        return InputError(f"manifest {self.file}: {field}: {problem}")

    def table(self, value, field: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            raise self.fail(field, f"expected a table, got {_kind(value)}")
        for key in value:
            if key not in allowed:
                raise self.fail(f"{field}.{key}" if field else key,
                                f"unknown field; known: {', '.join(allowed)}")
        for key in required:
            if key not in value:
                raise self.fail(f"{field}.{key}" if field else key, "missing")
        return value

    def string(self, value, field: str) -> str:
        if not isinstance(value, str):
            raise self.fail(field, f"expected a string, got {_kind(value)}")
        if not value.strip() or any(c in value for c in "\0\n\r"):
            raise self.fail(field, "expected a non-empty one-line string")
        return value

    def strings(self, value, field: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail(field, f"expected a list of strings, got {_kind(value)}")
        return tuple(self.string(item, f"{field}[{i}]") for i, item in enumerate(value))

    def boolean(self, value, field: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(field, f"expected true or false, got {_kind(value)}")
        return value

    def git_word(self, value, field: str) -> str:
        # git would take a leading '-' as an option: never pass one as a URL or ref
        text = self.string(value, field)
        if text.startswith("-") or any(c.isspace() for c in text):
            raise self.fail(field, f"{text!r} cannot start with '-' or contain spaces")
        return text

    def location(self, value, field: str) -> str:
        text = self.git_word(value, field)
        if _URL.fullmatch(text):
            return text
        path = (self.base / text).resolve()
        if not path.exists():
            raise self.fail(field, f"{text!r} is neither a URL nor an existing local path "
                                   f"(relative paths start at {self.base})")
        return str(path)

    def relative_path(self, value, field: str) -> str:
        text = self.string(value, field)
        parts = PurePosixPath(text).parts
        if text.startswith("/") or ".." in parts or not parts:
            raise self.fail(field, f"{text!r} must be a path inside the tree (relative, no '..')")
        return text

    def repo(self, value, field: str, name: str, extra: tuple[str, ...] = ()) -> tuple[Repo, dict]:
        keys = ("url", "ref", "submodules", "depth")
        data = self.table(value, field, keys + extra, required=("url", "ref"))
        depth = data.get("depth")
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
            raise self.fail(f"{field}.depth", f"expected a whole number >= 1, got {depth!r}")
        repo = Repo(
            name=name,
            url=self.location(data["url"], f"{field}.url"),
            ref=self.git_word(data["ref"], f"{field}.ref"),
            submodules=self.submodules(data.get("submodules", False), f"{field}.submodules"),
            depth=depth,
        )
        return repo, data

    def submodules(self, value, field: str) -> bool | tuple[str, ...]:
        if isinstance(value, list):
            if not value:
                raise self.fail(field, "an empty list: use false for no submodules")
            paths = tuple(self.relative_path(item, f"{field}[{i}]") for i, item in enumerate(value))
            for i, path in enumerate(paths):
                if path.startswith("-") or any(c.isspace() for c in path):
                    raise self.fail(f"{field}[{i}]", f"{path!r} cannot start with '-' or contain spaces")
            return paths
        if not isinstance(value, bool):
            raise self.fail(field, f"expected true, false or a list of submodule paths, got {_kind(value)}")
        return value

    def mirrors(self, value) -> tuple[Mirror, ...]:
        if not isinstance(value, dict):
            raise self.fail("mirrors", f'expected a table of "URL prefix" = "mirror" lines, got {_kind(value)}')
        return tuple(mirror_from(prefix, base, self.base, lambda field, problem: self.fail(field, problem))
                     for prefix, base in value.items())

    def patches(self, value, field: str, repos: dict[str, Repo]) -> tuple[PatchSet, ...]:
        if not isinstance(value, list):
            raise self.fail(field, f"expected a list of {{ repo = ..., glob = ... }} tables, got {_kind(value)}")
        sets = []
        for i, item in enumerate(value):
            where = f"{field}[{i}]"
            data = self.table(item, where, ("repo", "glob"), required=("repo", "glob"))
            repo = self.string(data["repo"], f"{where}.repo")
            if repo not in repos:
                known = ", ".join(sorted(repos)) or "none"
                raise self.fail(f"{where}.repo", f"{repo!r} is not a [repos.NAME] table (known: {known})")
            sets.append(PatchSet(repo=repo, glob=self.relative_path(data["glob"], f"{where}.glob")))
        return tuple(sets)

    def symbols(self, value, field: str) -> tuple[str, ...]:
        names = []
        for i, text in enumerate(self.strings(value, field)):
            match = _SYMBOL.fullmatch(text.strip())
            if not match:
                raise self.fail(f"{field}[{i}]", f"{text!r} is not a Kconfig symbol "
                                                 "(capital letters, digits, '_')")
            names.append(match.group(1))
        return tuple(names)

    def edk2_word(self, value, field: str, choices: tuple[str, ...] = ()) -> str:
        text = self.string(value, field)
        if choices and text not in choices:
            raise self.fail(field, f"{text!r}: use one of {', '.join(choices)}")
        if not _EDK2_WORD.fullmatch(text):
            raise self.fail(field, f"{text!r}: use capital letters, digits and '_'")
        return text

    def manifest(self, data: dict) -> Manifest:
        self.table(data, "", ("repos", "mirrors") + COMPONENTS)
        repos: dict[str, Repo] = {}
        repo_tables = data.get("repos", {})
        if not isinstance(repo_tables, dict):
            raise self.fail("repos", f"expected a table of [repos.NAME] tables, got {_kind(repo_tables)}")
        for name, value in repo_tables.items():
            if not _NAME.fullmatch(name) or name in COMPONENTS:
                raise self.fail(f"repos.{name}", "a repository name is letters, digits, '.', '_', "
                                                 f"'-' and not one of {', '.join(COMPONENTS)}")
            repos[name], _ = self.repo(value, f"repos.{name}", name)
        if not any(name in data for name in COMPONENTS):
            raise self.fail("kernel", f"the manifest builds nothing: add a [{'], ['.join(COMPONENTS)}] table")
        return Manifest(
            path=str(self.file.resolve()),
            repos=repos,
            kernel=self.kernel(data["kernel"], repos) if "kernel" in data else None,
            qemu=self.qemu(data["qemu"], repos) if "qemu" in data else None,
            ovmf=self.ovmf(data["ovmf"], repos) if "ovmf" in data else None,
            mirrors=self.mirrors(data.get("mirrors", {})),
        )

    def kernel(self, value, repos) -> Kernel:
        repo, data = self.repo(value, "kernel", "kernel", ("patches", "config", "package", "localversion"))
        config = self.table(data.get("config", {}), "kernel.config",
                            ("base", "enable", "module", "disable"))
        base = self.string(config.get("base", "current"), "kernel.config.base")
        if base not in KERNEL_BASES:
            path = (self.base / base).resolve()
            if not path.is_file():
                raise self.fail("kernel.config.base", f"{base!r} is neither "
                                f"{' nor '.join(KERNEL_BASES)} nor an existing config file")
            base = str(path)
        wanted = {state: self.symbols(config.get(state, []), f"kernel.config.{state}")
                  for state in ("enable", "module", "disable")}
        seen: dict[str, str] = {}
        for state, names in wanted.items():
            for name in names:
                if name in seen:
                    raise self.fail(f"kernel.config.{state}",
                                    f"{name} is also in kernel.config.{seen[name]}; list it once")
                seen[name] = state
        package = data.get("package")
        if package is not None and package not in KERNEL_PACKAGES:
            raise self.fail("kernel.package", f"{package!r}: use {' or '.join(map(repr, KERNEL_PACKAGES))} "
                                              "(Debian packages), or leave it out for the loose build")
        localversion = data.get("localversion", DEFAULT_LOCALVERSION)
        if not isinstance(localversion, str) or not _LOCALVERSION.fullmatch(localversion):
            raise self.fail("kernel.localversion", f"{localversion!r}: start with '-', '+' or '.', then "
                                                   "up to 31 lower-case letters, digits, '+', '-' or '.'")
        return Kernel(repo=repo, patches=self.patches(data.get("patches", []), "kernel.patches", repos),
                      config=KernelConfig(base=base, **wanted), package=package, localversion=localversion)

    def qemu(self, value, repos) -> Qemu:
        repo, data = self.repo(value, "qemu", "qemu", ("patches", "configure"))
        return Qemu(repo=repo, patches=self.patches(data.get("patches", []), "qemu.patches", repos),
                    configure=self.strings(data.get("configure", []), "qemu.configure"))

    def ovmf(self, value, repos) -> Ovmf:
        repo, data = self.repo(value, "ovmf", "ovmf",
                               ("patches", "platform", "target", "arch", "toolchain"))
        for key in ("platform", "target", "toolchain"):
            if key not in data:
                raise self.fail(f"ovmf.{key}", "missing")
        platform = self.relative_path(data["platform"], "ovmf.platform")
        if not platform.endswith(".dsc"):
            raise self.fail("ovmf.platform", f"{platform!r} is not a .dsc platform file")
        return Ovmf(
            repo=repo,
            patches=self.patches(data.get("patches", []), "ovmf.patches", repos),
            platform=platform,
            target=self.edk2_word(data["target"], "ovmf.target", EDK2_TARGETS),
            arch=self.edk2_word(data.get("arch", "X64"), "ovmf.arch"),
            toolchain=self.edk2_word(data["toolchain"], "ovmf.toolchain"),
        )


def mirror_from(prefix, base, relative_to: Path, fail) -> Mirror:
    """One mirror line, checked; ``fail(field, problem)`` makes the error to raise."""
    field = f"mirrors.{prefix!r}" if isinstance(prefix, str) else "mirrors"
    if not isinstance(base, str):
        raise fail(field, f"expected a string (a folder of mirrors or a URL), got {_kind(base)}")
    for what, text in (("URL prefix", prefix), ("mirror", base)):
        if (not text.strip() or text.startswith("-") or "=" in text
                or any(c.isspace() or c == "\0" for c in text)):
            raise fail(field, f"the {what} {text!r} must be non-empty, not start with '-', "
                              "and hold no spaces or '='")
    if not _URL.match(prefix):
        raise fail(field, f"{prefix!r} is not a URL prefix (https://github.com/, git@host:)")
    if _URL.fullmatch(base):
        return Mirror(prefix, base)
    folder = (relative_to / base).resolve()
    if not folder.is_dir():
        raise fail(field, f"{base!r} is neither a URL nor an existing folder of mirrors "
                          f"(relative paths start at {relative_to})")
    # git joins base and the rest of the URL as text: keep the separator the user wrote
    return Mirror(prefix, str(folder) + ("/" if base.endswith("/") else ""))


def with_mirrors(manifest: Manifest, lines: tuple[str, ...]) -> Manifest:
    """The manifest with ``--mirror PREFIX=MIRROR`` lines added (they win over [mirrors])."""
    import dataclasses

    added = []
    for line in lines:
        prefix, sign, base = line.partition("=")
        if not sign:
            raise InputError(f"--mirror {line!r}: use --mirror URL-PREFIX=MIRROR "
                             "(e.g. https://github.com/=/srv/mirrors/)")
        added.append(mirror_from(prefix, base, Path.cwd(),
                                 lambda _field, problem: InputError(f"--mirror {line!r}: {problem}")))
    prefixes = {mirror.prefix for mirror in added}
    kept = tuple(mirror for mirror in manifest.mirrors if mirror.prefix not in prefixes)
    return dataclasses.replace(manifest, mirrors=kept + tuple(added))


def with_all_submodules(manifest: Manifest, wanted: bool) -> Manifest:
    """The manifest with ``--all-submodules``: every component that names the submodules
    its build needs gets all of them (a tree for other platforms than the one built)."""
    import dataclasses

    if not wanted:
        return manifest
    changed = {}
    for name in manifest.components():
        component = manifest.component(name)
        if isinstance(component.repo.submodules, tuple):
            changed[name] = dataclasses.replace(
                component, repo=dataclasses.replace(component.repo, submodules=True))
    return dataclasses.replace(manifest, **changed)


def with_kernel_package(manifest: Manifest, package: str | None) -> Manifest:
    """The manifest with ``--deb`` applied (a manifest without [kernel] is left as it is)."""
    import dataclasses

    if package is None or manifest.kernel is None:
        return manifest
    return dataclasses.replace(manifest, kernel=dataclasses.replace(manifest.kernel, package=package))


def _kind(value) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)
