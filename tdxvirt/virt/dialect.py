"""Which TDX XML dialect a target libvirt speaks, decided from what it reports.

- native: libvirt >= 11.6, ``<launchSecurity type='tdx'>``
- canonical: Canonical's patched libvirt (older version, yet its domain capabilities
  report TDX); quote service as a SocketAddress child
- qemu-args: libvirt without TDX driving a TDX-patched QEMU through
  ``<qemu:commandline>`` (the source document's setup); never chosen automatically,
  because only the user knows their QEMU is patched
"""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from ..errors import HostNotReadyError
from ..host import HostRoot

LIBVIRT_NATIVE_TDX = 11_006_000
KVM_INTEL_TDX = "/sys/module/kvm_intel/parameters/tdx"


def version_text(version: int) -> str:
    return f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}"


@dataclass(frozen=True)
class LibvirtFacts:
    version: int
    driver: str  # "QEMU", "TEST", ...
    domcaps_tdx: bool | None  # None: this driver does not model host TDX support
    uri: str


def domcaps_report_tdx(xml: str) -> bool:
    caps = etree.fromstring(xml.encode())
    return bool(caps.xpath("features/tdx[@supported='yes'] | "
                           "features/launchSecurity[@supported='yes']/enum[@name='sectype']/value[.='tdx']"))


def probe(conn, virt_type: str = "kvm") -> LibvirtFacts:
    from .conn import libvirt_error_type

    driver = conn.getType()
    domcaps_tdx = None
    if driver.upper() != "TEST":  # the test driver's domain capabilities describe no real host
        try:
            xml = conn.getDomainCapabilities(None, "x86_64", "q35", virt_type, 0)
            domcaps_tdx = domcaps_report_tdx(xml)
        except libvirt_error_type():
            domcaps_tdx = False
    return LibvirtFacts(conn.getLibVersion(), driver, domcaps_tdx, conn.getURI())


def host_tdx_enabled(host: HostRoot) -> bool | None:
    value = host.read_value(KVM_INTEL_TDX)
    return None if value is None else value in ("Y", "y", "1")


def choose(forced: str | None, facts: LibvirtFacts, host_tdx: bool | None) -> str:
    """The dialect to render; raise HostNotReadyError naming what is missing."""
    if forced:
        return forced
    where = f"libvirt {version_text(facts.version)} at {facts.uri}"
    if facts.version < LIBVIRT_NATIVE_TDX:
        if facts.domcaps_tdx:
            return "canonical"
        raise HostNotReadyError(
            f"{where} does not know TDX launch security (needs libvirt "
            f"{version_text(LIBVIRT_NATIVE_TDX)} or newer); with a TDX-patched QEMU, "
            "force --dialect qemu-args"
        )
    if facts.domcaps_tdx is False:
        raise HostNotReadyError(
            f"{where} reports no TDX support in its domain capabilities (TDX off in the "
            "BIOS, kvm_intel without tdx=on, or a QEMU without tdx-guest); "
            "`tdxvirt host check` says which, or use --no-tdx"
        )
    if host_tdx is False:
        raise HostNotReadyError(
            f"TDX is not enabled in KVM on this host ({KVM_INTEL_TDX} is not Y); load "
            "kvm_intel with tdx=on (`tdxvirt host setup`), or use --no-tdx"
        )
    return "native"
