"""What the checks share: the host root, libvirt (opened once, lazily), QEMU's answers.

libvirt answers for the host it is connected to, local or remote; the host root and
the runner only describe the machine tdxvirt runs on, so sysfs-only checks are skipped
when the URI names another host.

Below a host root other than ``/`` no program is run by default (``host_runner``): a
check that needs one (QEMU's ``-object help``) is reported as skipped. Code that means
to run a tree's programs passes ``runner=SubprocessRunner(root)`` itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cached_property
from urllib.parse import urlsplit

from ..errors import TdxvirtError
from ..host.commands import NOT_RUN, CommandRunner, host_runner, refuses
from ..host.root import HostRoot
from ..pci import PciAddress
from .check import SKIP, Check

# Where distributions install QEMU, searched when libvirt does not name the emulator.
EMULATORS = ("/usr/bin/qemu-system-x86_64", "/usr/local/bin/qemu-system-x86_64",
             "/usr/libexec/qemu-kvm", "/usr/bin/qemu-kvm")
_QEMU_VERSION = re.compile(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?")


def is_remote(uri: str | None) -> bool:
    """A URI naming a host (``qemu+ssh://host/system``) reaches another machine."""
    if not uri:
        return False
    try:
        return bool(urlsplit(uri).hostname)
    except ValueError:
        return False


def parse_object_help(output: str) -> set[str]:
    """Type names from ``qemu-system-x86_64 -object help`` (indented, one per line)."""
    return {line.split()[0] for line in output.splitlines()
            if line[:1].isspace() and line.strip()}


def parse_qemu_version(output: str) -> tuple[int, int, int] | None:
    match = _QEMU_VERSION.search(output)
    if not match:
        return None
    return int(match[1]), int(match[2]), int(match[3] or 0)


class Context:
    def __init__(self, root: HostRoot, uri: str | None = None,
                 connect: Callable[[], object] | None = None,
                 runner: CommandRunner | None = None,
                 gpus: tuple[PciAddress, ...] = ()):
        self.root = root
        self.uri = uri
        self._connect = connect
        self.runner = runner or host_runner(root)
        self.gpus = gpus
        self.conn_error: str | None = None

    @property
    def runs_programs(self) -> bool:
        """False below a host root other than ``/`` unless a runner was given for it."""
        return not refuses(self.runner)

    @property
    def remote(self) -> bool:
        return is_remote(self.uri)

    def skip_if_remote(self, name: str) -> Check | None:
        if not self.remote:
            return None
        return Check(name, SKIP, f"remote host ({self.uri}): read only on that host itself",
                     "run `tdxvirt host check` on that host for this check")

    @cached_property
    def conn(self):
        if self._connect is None:
            self.conn_error = "no libvirt connection was asked for"
            return None
        try:
            return self._connect()
        except TdxvirtError as error:
            self.conn_error = str(error)
            return None

    @cached_property
    def driver(self) -> str | None:
        return None if self.conn is None else self.conn.getType()

    @property
    def test_driver(self) -> bool:
        return (self.driver or "").upper() == "TEST"

    @cached_property
    def libvirt_version(self) -> int | None:
        return None if self.conn is None else self.conn.getLibVersion()

    @cached_property
    def domcaps(self):
        """libvirt's domain capabilities for a q35 KVM guest (lxml element), or None."""
        if self.conn is None:
            return None
        from lxml import etree

        from ..virt.conn import libvirt_error_type

        for virttype in ("kvm", None):
            try:
                xml = self.conn.getDomainCapabilities(None, "x86_64", "q35", virttype, 0)
            except libvirt_error_type():
                continue
            return etree.fromstring(xml.encode())
        return None

    def domcaps_tdx(self) -> bool | None:
        """Whether domain capabilities report TDX; None when they say nothing of it."""
        if self.domcaps is None:
            return None
        feature = self.domcaps.find("features/tdx")
        sectypes = self.domcaps.xpath("features/launchSecurity/enum[@name='sectype']/value/text()")
        if feature is None and not sectypes:
            return None
        return (feature is not None and feature.get("supported") == "yes") or "tdx" in sectypes

    @cached_property
    def emulator(self) -> str | None:
        """The QEMU libvirt uses (domain capabilities' path), else a standard install of
        this machine (never for a remote URI: this machine's files say nothing there)."""
        if self.domcaps is not None:
            path = self.domcaps.findtext("path")
            if path:
                return path
        if self.remote:
            return None
        return next((e for e in EMULATORS if self.root.exists(e)), None)

    @cached_property
    def qemu_objects(self) -> tuple[set[str] | None, str | None]:
        """(object types, None) from ``-object help``, or (None, why not)."""
        if self.emulator is None:
            return None, "no QEMU found"
        if not self.runs_programs:
            return None, NOT_RUN
        result = self.runner.run((self.emulator, "-object", "help"), timeout=30)
        if not result.ok:
            return None, f"`{self.emulator} -object help` failed: {result.tail() or 'no output'}"
        return parse_object_help(result.stdout), None

    @cached_property
    def qemu_version(self) -> tuple[int, int, int] | None:
        if self.emulator is None or not self.runs_programs:
            return None
        result = self.runner.run((self.emulator, "--version"), timeout=30)
        return parse_qemu_version(result.stdout) if result.ok else None
