"""What this host already has from its distribution: the TDX kernel, QEMU, libvirt, OVMF.

``tdxvirt build plan|run`` starts here and plans only the components the host lacks
(``--all`` plans every one). Each component is found ``present``, ``missing`` or
``unknown``, with one line saying what was read:

- kernel: kvm_intel's ``tdx`` parameter (it exists only in a kernel whose KVM has
  TDX), else the running kernel's config: CONFIG_INTEL_TDX_HOST=y with
  CONFIG_KVM_INTEL_TDX=y (Linux 6.16+). Before 6.16 INTEL_TDX_HOST alone is only the
  TDX host core (6.8+): KVM runs TDs there only when patched, which the config does
  not tell, so that is ``unknown``.
- QEMU: a ``qemu-system-x86_64`` whose ``-object help`` lists ``tdx-guest``.
- libvirt: ``virtqemud --version`` / ``libvirtd --version`` >= 11.6 (native TDX).
  tdxvirt build does not build libvirt: a missing one is reported, never planned.
- OVMF: a QEMU firmware descriptor with the ``intel-tdx`` feature whose file exists.

Programs run only for the host root ``/`` (``host_runner``). Below any other root
nothing is run: the facts come from files (the root's package status file
``/var/lib/dpkg/status``) or are reported ``unknown``. ``unknown`` is planned: only
what is known to be there is left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import HostNotReadyError
from ..host import HostRoot
from ..host.commands import SEARCH_DIRS, CommandRunner, host_runner, refuses
from ..host.firmware import find_tdx_ovmf
from ..host.kconfig import read_kernel_config

PRESENT, MISSING, UNKNOWN = "present", "missing", "unknown"
CHECKED = ("kernel", "qemu", "libvirt", "ovmf")
NOT_BUILT = ("libvirt",)  # reported, never planned: tdxvirt build does not build it

KVM_INTEL_TDX = "/sys/module/kvm_intel/parameters/tdx"
FIRST_KVM_TDX = (6, 16)  # Linux: KVM_INTEL_TDX
FIRST_TDX_QEMU = (10, 1)  # QEMU: the tdx-guest object
LIBVIRT_NATIVE_TDX = (11, 6)  # libvirt: <launchSecurity type='tdx'>
LIBVIRT_HOSTDEV_IOMMUFD = (12, 1)  # libvirt: <hostdev> with iommufd
TDX_OBJECT = "tdx-guest"
# Where distributions install QEMU (as `tdxvirt host check` looks for it).
EMULATORS = ("/usr/bin/qemu-system-x86_64", "/usr/local/bin/qemu-system-x86_64",
             "/usr/libexec/qemu-kvm", "/usr/bin/qemu-kvm")
QEMU_PACKAGES = ("qemu-system-x86",)  # Debian, Ubuntu
LIBVIRT_PACKAGES = ("libvirt-daemon-driver-qemu", "libvirt-daemon")  # Debian, Ubuntu
LIBVIRT_DAEMONS = ("virtqemud", "libvirtd")
DPKG_STATUS = "/var/lib/dpkg/status"
LIBVIRT_REMEDY = ("tdxvirt build does not build libvirt: install libvirt >= 11.6 "
                  "(Debian forky, Ubuntu 25.10 or newer)")

_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")
_DEB_VERSION = re.compile(r"(?:\d+:)?(\d+)\.(\d+)(?:\.(\d+))?")


def _printable(text: str) -> str:
    """Escapes for what a terminal would act on (a fake root's files say anything)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass(frozen=True)
class Finding:
    component: str
    state: str  # PRESENT, MISSING or UNKNOWN
    detail: str  # one line: what was read, what it says

    def __post_init__(self):
        object.__setattr__(self, "detail", _printable(self.detail))

    @property
    def planned(self) -> bool:
        """Whether tdxvirt build plans it (what is not known to be there)."""
        return self.state != PRESENT and self.component not in NOT_BUILT


@dataclass(frozen=True)
class Report:
    root: str  # the host root the facts were read below
    findings: tuple[Finding, ...]

    def get(self, component: str) -> Finding:
        return next(f for f in self.findings if f.component == component)

    def to_json(self) -> dict:
        return {"root": self.root,
                "components": [{"component": f.component, "state": f.state, "detail": f.detail}
                               for f in self.findings]}


def check(root: HostRoot, runner: CommandRunner | None = None) -> Report:
    """Every component's state on this host. ``runner`` defaults to what may run for
    the root (``/``: this machine's programs; any other root: nothing)."""
    runner = runner if runner is not None else host_runner(root)
    packages = _Packages(root)
    findings = (check_kernel(root), check_qemu(root, runner, packages),
                check_libvirt(root, runner, packages), check_ovmf(root))
    return Report(str(root.base), findings)


# --- the package status file ------------------------------------------------------

def dpkg_installed(root: HostRoot, wanted=QEMU_PACKAGES + LIBVIRT_PACKAGES) -> dict[str, str] | None:
    """Installed package -> version, of the ``wanted`` packages, from the root's dpkg
    status file; None when there is none to read."""
    try:
        text = root.path(DPKG_STATUS).read_text(encoding="utf-8", errors="replace")
    except (OSError, ValueError):
        return None
    heads = {f"Package: {name}\n" for name in wanted}
    installed: dict[str, str] = {}
    for paragraph in text.split("\n\n"):
        head = paragraph.lstrip("\n")
        if head[:head.find("\n") + 1] not in heads:
            continue  # dpkg writes Package: first; only the wanted ones are read
        fields: dict[str, str] = {}
        for line in paragraph.splitlines():
            if line[:1].isspace() or ":" not in line:
                continue  # a continued field (Description, Conffiles): not needed
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        package, version = fields.get("Package"), fields.get("Version")
        status = fields.get("Status", "").split()
        if package and version and status[-1:] == ["installed"]:
            installed[package] = version
    return installed


class _Packages:
    """The dpkg status file, read once for QEMU and libvirt."""

    def __init__(self, root: HostRoot):
        self.root = root
        self._installed: dict[str, str] | None = None
        self._read = False

    def installed(self) -> dict[str, str] | None:
        if not self._read:
            self._installed, self._read = dpkg_installed(self.root), True
        return self._installed


def _first_package(packages: dict[str, str] | None, names) -> tuple[str, str] | None:
    for name in names:
        if packages and name in packages:
            return name, packages[name]
    return None


def debian_upstream_version(version: str) -> tuple[int, int, int] | None:
    """``1:10.1.0+ds-5`` -> (10, 1, 0): the upstream part of a Debian version."""
    match = _DEB_VERSION.match(version)
    return (int(match[1]), int(match[2]), int(match[3] or 0)) if match else None


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


# --- kernel -------------------------------------------------------------------------

def kernel_version(release: str | None) -> tuple[int, int] | None:
    match = _VERSION.match(release or "")
    return (int(match[1]), int(match[2])) if match else None


def check_kernel(root: HostRoot) -> Finding:
    release = root.read_value("/proc/sys/kernel/osrelease")
    running = f"running kernel {release}" if release else "the running kernel"
    tdx = root.read_value(KVM_INTEL_TDX)
    if tdx is not None:
        if tdx.upper() in ("Y", "1"):
            return Finding("kernel", PRESENT, f"{running}: kvm_intel's tdx parameter is {tdx}")
        return Finding("kernel", PRESENT, f"{running}: kvm_intel has a tdx parameter (now {tdx}: "
                                          "`tdxvirt host setup` turns it on)")
    loaded_without_tdx = root.path("/sys/module/kvm_intel/parameters").is_dir()
    config = read_kernel_config(root)
    if config is None:
        if loaded_without_tdx:
            return Finding("kernel", MISSING, f"{running}: kvm_intel is loaded and has no tdx "
                                              "parameter: its KVM has no TDX")
        return Finding("kernel", UNKNOWN, f"{running}: no {KVM_INTEL_TDX} (kvm_intel not loaded) "
                                          "and no kernel config (/boot/config-$(uname -r), "
                                          "/proc/config.gz) to read")
    where = config.source
    if config.value("INTEL_TDX_HOST") != "y":
        return Finding("kernel", MISSING, f"{running}: {where} does not set CONFIG_INTEL_TDX_HOST=y")
    if config.enabled("KVM_INTEL_TDX"):
        return Finding("kernel", PRESENT, f"{running}: {where} sets CONFIG_INTEL_TDX_HOST=y, "
                                          "CONFIG_KVM_INTEL_TDX=y")
    version = kernel_version(config.release or release)
    if loaded_without_tdx or (version is not None and version >= FIRST_KVM_TDX):
        why = ("kvm_intel is loaded without a tdx parameter" if loaded_without_tdx
               else "CONFIG_KVM_INTEL_TDX is not set")
        return Finding("kernel", MISSING, f"{running}: {where} sets CONFIG_INTEL_TDX_HOST=y but "
                                          f"{why}: its KVM has no TDX")
    shown = _dotted(version) if version else "this kernel"
    return Finding("kernel", UNKNOWN, f"{running}: {where} sets CONFIG_INTEL_TDX_HOST=y, but "
                                      f"Linux {shown} predates KVM's TDX (6.16): only a patched "
                                      "kernel runs TDs; load kvm_intel to tell by its tdx parameter")


# --- QEMU ---------------------------------------------------------------------------

def parse_object_help(output: str) -> set[str]:
    """Type names from ``-object help`` (indented, one per line), as the doctor reads it."""
    return {line.split()[0] for line in output.splitlines() if line[:1].isspace() and line.strip()}


def check_qemu(root: HostRoot, runner: CommandRunner, packages: _Packages | None = None) -> Finding:
    emulator = next((path for path in EMULATORS if root.exists(path)), None)
    if emulator is not None and not refuses(runner):
        result = runner.run((emulator, "-object", "help"), timeout=30)
        if not result.ok:
            return Finding("qemu", UNKNOWN, f"`{emulator} -object help` failed: "
                                            f"{result.tail() or f'exit status {result.returncode}'}")
        if TDX_OBJECT in parse_object_help(result.stdout):
            return Finding("qemu", PRESENT, f"{emulator} lists {TDX_OBJECT} (-object help)")
        return Finding("qemu", MISSING, f"{emulator} has no {TDX_OBJECT} object (-object help; "
                                        "QEMU >= 10.1 has it)")
    package = _first_package((packages or _Packages(root)).installed(), QEMU_PACKAGES)
    if package is not None:
        name, version = package
        upstream = debian_upstream_version(version)
        if upstream is None:
            return Finding("qemu", UNKNOWN, f"package {name} {version}: not a version to compare")
        state = PRESENT if upstream[:2] >= FIRST_TDX_QEMU else MISSING
        relation = ">=" if state == PRESENT else "<"
        return Finding("qemu", state, f"package {name} {version} ({DPKG_STATUS}): {relation} 10.1, "
                                      f"{'has' if state == PRESENT else 'no'} {TDX_OBJECT}")
    if emulator is not None:  # there, but not run below another root, and no package says
        return Finding("qemu", UNKNOWN, f"{emulator} is there but is not run below host root "
                                        f"{root.base}, and no {QEMU_PACKAGES[0]} package is "
                                        f"recorded in {DPKG_STATUS}")
    return Finding("qemu", MISSING, "no qemu-system-x86_64 (" + ", ".join(EMULATORS[:2]) + ") and "
                                    f"no {QEMU_PACKAGES[0]} package")


# --- libvirt ------------------------------------------------------------------------

def _libvirt_finding(version: tuple[int, int, int], source: str) -> Finding:
    shown = _dotted(version)
    if version[:2] < LIBVIRT_NATIVE_TDX:
        return Finding("libvirt", MISSING, f"{source}: {shown} < 11.6 (no native TDX); {LIBVIRT_REMEDY}")
    note = "" if version[:2] >= LIBVIRT_HOSTDEV_IOMMUFD else "; GPU hostdevs through iommufd need 12.1"
    return Finding("libvirt", PRESENT, f"{source}: {shown} >= 11.6 (native TDX){note}")


def check_libvirt(root: HostRoot, runner: CommandRunner, packages: _Packages | None = None) -> Finding:
    daemons = [f"{d}/{name}" for name in LIBVIRT_DAEMONS for d in SEARCH_DIRS if root.exists(f"{d}/{name}")]
    if daemons and not refuses(runner):
        for daemon in daemons:
            result = runner.run((daemon, "--version"), timeout=30)
            match = _VERSION.search(result.stdout) if result.ok else None
            if match:
                version = (int(match[1]), int(match[2]), int(match[3] or 0))
                return _libvirt_finding(version, f"`{daemon} --version`")
    package = _first_package((packages or _Packages(root)).installed(), LIBVIRT_PACKAGES)
    if package is not None:
        name, version = package
        upstream = debian_upstream_version(version)
        if upstream is not None:
            return _libvirt_finding(upstream, f"package {name} {version}")
        return Finding("libvirt", UNKNOWN, f"package {name} {version}: not a version to compare")
    if daemons:
        how = ("gave no version" if not refuses(runner)
               else f"is not run below host root {root.base}")
        return Finding("libvirt", UNKNOWN, f"{daemons[0]} {how}, and no libvirt-daemon package is "
                                           f"recorded in {DPKG_STATUS}")
    return Finding("libvirt", MISSING, f"no libvirt daemon ({', '.join(LIBVIRT_DAEMONS)}) and no "
                                       f"libvirt-daemon package; {LIBVIRT_REMEDY}")


# --- OVMF ---------------------------------------------------------------------------

def check_ovmf(root: HostRoot) -> Finding:
    try:
        path = find_tdx_ovmf(root)
    except HostNotReadyError:
        return Finding("ovmf", MISSING, "no QEMU firmware descriptor with feature intel-tdx in "
                                        "/usr/share/qemu/firmware or /etc/qemu/firmware")
    if not root.exists(path):
        return Finding("ovmf", MISSING, f"a firmware descriptor with intel-tdx names {path}, "
                                        "which is not there")
    return Finding("ovmf", PRESENT, f"{path} (a QEMU firmware descriptor lists it with intel-tdx)")
