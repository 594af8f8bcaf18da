"""Opening libvirt, and turning libvirt's errors into tdxvirt's.

libvirt-python is imported here and only here (and only when a command needs it), so
``tdxvirt --help`` stays fast.
"""

from __future__ import annotations

import os

from ..errors import (
    LibvirtOperationError,
    LibvirtUnavailableError,
    NotFoundError,
    TdxvirtError,
)

DEFAULT_URI = "qemu:///system"


def resolve_uri(explicit: str | None) -> str:
    """Like virsh: -c/--connect, else LIBVIRT_DEFAULT_URI, else qemu:///system."""
    return explicit or os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI


def is_remote(uri: str) -> bool:
    """True when the URI names another host (qemu+ssh://host/system)."""
    from urllib.parse import urlparse

    return bool(urlparse(uri).hostname)


LOCAL_HOST = "localhost"
_LOOPBACK = {"localhost", "localhost.localdomain", "::1", "ip6-localhost"}


def host_of(uri: str) -> str:
    """The host a URI's TDs run on, as tdxvirt names it in lock keys and messages: the
    URI's hostname (lower case, port dropped), or ``localhost`` for a URI naming no host
    or a loopback one. Two names of one host stay two names (DNS is never asked), and
    two ports of one name are one host: a lock then serialises more than it must,
    never less."""
    from urllib.parse import urlparse

    try:
        host = (urlparse(uri).hostname or "").lower()
    except ValueError:
        host = ""
    if not host or host in _LOOPBACK or host.startswith("127."):
        return LOCAL_HOST
    return host


BINDINGS_MISSING = ("libvirt's Python bindings are not installed; install them: Debian/Ubuntu "
                    "`apt install python3-libvirt` (for the system Python), or `pip install "
                    "libvirt-python` (needs libvirt-dev, pkg-config and gcc)")


def _libvirt():
    try:
        import libvirt
    except ImportError:
        raise LibvirtUnavailableError(BINDINGS_MISSING) from None

    # libvirt prints every error to stderr by default; tdxvirt reports them itself.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def message(error: Exception) -> str:
    """libvirt's message on one line."""
    text = getattr(error, "get_error_message", lambda: None)() or str(error)
    return " ".join(text.split())


def open_connection(uri: str):
    libvirt = _libvirt()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as error:
        raise LibvirtUnavailableError(
            f"cannot connect to libvirt at {uri}: {message(error)}; check that the "
            "daemon runs and the URI is right (-c URI)"
        ) from None


def translate(error: Exception, what: str) -> TdxvirtError:
    """A tdxvirt error for a libvirtError raised while doing ``what``."""
    libvirt = _libvirt()
    code = error.get_error_code() if isinstance(error, libvirt.libvirtError) else None
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return NotFoundError(f"{what}: {message(error)}")
    # VIR_ERR_SYSTEM_ERROR alone is also a file the daemon could not open during a
    # start (a device's sysfs, a disk): a lost connection only from the RPC layers,
    # which also say "client socket is closed" as an internal error (a host switched
    # off, its sshd killed): judged by error domain as well as code.
    domain = error.get_error_domain() if isinstance(error, libvirt.libvirtError) else None
    lost = code in (libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_NO_CONNECT) or (
        code in (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_INTERNAL_ERROR)
        and domain in (libvirt.VIR_FROM_REMOTE, libvirt.VIR_FROM_RPC))
    if lost:
        return LibvirtUnavailableError(f"{what}: lost the libvirt connection: {message(error)}")
    return LibvirtOperationError(f"{what}: {message(error)}")


def libvirt_error_type():
    return _libvirt().libvirtError


def xml_of_listed(domain) -> str | None:
    """A listed domain's XML, or None when it vanished since the listing (another
    process undefined it): a race every bulk walk over domains must survive."""
    libvirt = _libvirt()
    try:
        return domain.XMLDesc(0)
    except libvirt.libvirtError as error:
        if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise translate(error, "cannot read a domain's XML") from None


def xmls_of_listed(domains: list):
    """Each listed domain's XML in order (None for one that vanished), read by one
    thread while the caller parses the previous one. Measured on 1,000 TDs: more
    readers only add GIL contention (the test driver serialises calls), and
    concurrent.futures costs more to import than this saves."""
    import queue
    import threading

    results: queue.SimpleQueue = queue.SimpleQueue()

    def read():
        try:
            for domain in domains:
                results.put((xml_of_listed(domain), None))
        except BaseException as error:  # handed to the caller, raised there
            results.put((None, error))

    threading.Thread(target=read, daemon=True).start()  # now, not at the first next()

    def delivered():
        for _ in domains:
            xml, error = results.get()
            if error is not None:
                raise error
            yield xml

    return delivered()


def qemu_version(conn) -> tuple[int, int, int] | None:
    """The QEMU a qemu driver connection runs (its hypervisor version), or None for
    another driver (libvirt's test driver runs no QEMU) or when libvirt does not say."""
    try:
        if conn.getType().upper() != "QEMU":
            return None
        version = conn.getVersion()
    except libvirt_error_type():
        return None
    return (version // 1_000_000, version // 1000 % 1000, version % 1000) if version else None
