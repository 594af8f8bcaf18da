"""The guest networks a host offers, as that host's libvirt says: `define --network`
resolved and checked, and a TD's NICs checked before a start.

virt-install's default is followed: libvirt's 'default' network when the host has one
(Debian's libvirt-daemon-config-network defines it: NAT on virbr0 with DHCP), else no
NIC, said as a warning. A network libvirt does not know, or that is not active, makes
the start fail with libvirt's words; tdxvirt says it first, with the command that fixes
it. Facts come from the host's libvirt (networks) or, on this machine only, its files
(passt, bridges); for a remote host what libvirt cannot tell is left to the start.
"""

from __future__ import annotations

import shlex

from ..errors import InputError, LibvirtUnavailableError
from .conn import libvirt_error_type, translate

VIR_ERR_NO_NETWORK = 43

# The words shared by define's warnings and the preflight's problems.
DEFAULT_MISSING = ("define libvirt's default network there (Debian: libvirt-daemon-config-network), "
                   "or give --network bridge=BR, network=NAME or user")


def network_state(conn, name: str) -> str | None:
    """'active', 'inactive' or 'missing'; None when libvirt cannot say (no network
    driver on that host). A lost connection is raised, not taken for an answer."""
    try:
        network = conn.networkLookupByName(name)
        return "active" if network.isActive() else "inactive"
    except libvirt_error_type() as error:
        if error.get_error_code() == VIR_ERR_NO_NETWORK:
            return "missing"
        failure = translate(error, f"cannot look up libvirt network {name!r}")
        if isinstance(failure, LibvirtUnavailableError):
            raise failure from None
        return None


def _inactive(name: str) -> str:
    return (f"libvirt network {name!r} is not active; `virsh net-start {name}` starts it "
            f"(and `virsh net-autostart {name}` at every boot)")


def resolve(conn, uri: str, facts, network: str, ssh_keys: tuple = (),
            vsock: bool = False) -> tuple[str, list[str]]:
    """The --network a TD gets (spec.parse_network's form, 'auto' decided) and the
    warnings about it; InputError for a network or bridge the host does not have, and
    for ssh keys given to a TD nobody could reach."""
    warnings: list[str] = []
    asked = network
    kind, _, source = network.partition("=")
    if kind == "auto":
        state = network_state(conn, "default")
        if state in ("active", "inactive"):
            network, kind, source = "network=default", "network", "default"
        else:
            network = kind = "none"
            if not ssh_keys:
                why = "libvirt there has no network driver" if state is None else \
                    "it has no libvirt network 'default'"
                warnings.append(f"the TD gets no NIC: {why} ({uri}); {DEFAULT_MISSING}")
    if kind == "network":
        state = network_state(conn, source)
        if state == "missing":
            remedy = DEFAULT_MISSING if source == "default" else \
                f"`virsh -c {shlex.quote(uri)} net-list --all` lists the networks there"
            raise InputError(f"--network {network}: libvirt at {uri} has no network "
                             f"{source!r}; {remedy}")
        if state == "inactive":
            warnings.append(_inactive(source))
        if state is None:
            warnings.append(f"libvirt at {uri} cannot say whether network {source!r} exists "
                            "(no network driver?): the start fails if it does not")
    if kind == "bridge" and facts.bridge_exists(source) is False:
        raise InputError(f"--network bridge={source}: {facts.where} has no bridge {source!r} "
                         "(`ip -br link show type bridge` lists them); create it, or use "
                         "--network default")
    if kind == "user" and facts.program_installed("passt") is False:
        warnings.append("passt is not installed on this host (Debian: passt); libvirt runs "
                        "it for --network user, so the TD will not start until it is")
    if network == "none" and ssh_keys and not vsock:
        why = "--network none gives it no NIC" if asked == "none" else \
            f"libvirt at {uri} has no network 'default' to give it a NIC"
        raise InputError(f"--ssh-key is for an ssh nobody could reach: {why}; give --network "
                         "default, bridge=BR, network=NAME or user, or --vsock (ssh over "
                         "vsock), or drop --ssh-key")
    return network, warnings


def interface_problems(conn, facts, domain) -> list[str]:
    """Before a start: the NICs of ``domain`` (tdxvirt.domain.domainxml.DomainXML) whose
    network is missing or inactive, or whose passt the host lacks."""
    problems = []
    for interface in domain.devices("interface"):
        kind = interface.get("type")
        source = interface.find("source")
        if kind == "network" and source is not None and source.get("network"):
            name = source.get("network")
            state = network_state(conn, name)
            if state == "missing":
                problems.append(f"libvirt network {name!r} does not exist on {facts.where}; "
                                f"{DEFAULT_MISSING if name == 'default' else 'define it'}, or "
                                "give the TD another NIC")
            elif state == "inactive":
                problems.append(_inactive(name))
        elif kind == "bridge" and source is not None and source.get("bridge"):
            if facts.bridge_exists(source.get("bridge")) is False:
                problems.append(f"bridge {source.get('bridge')!r} does not exist on "
                                f"{facts.where}; create it, or give the TD another NIC")
        elif kind == "user":
            backend = interface.find("backend")
            if backend is not None and backend.get("type") == "passt" \
                    and facts.program_installed("passt") is False:
                problems.append("passt is not installed on this host (Debian: passt); "
                                "libvirt runs it for the TD's user-mode NIC")
    return problems
