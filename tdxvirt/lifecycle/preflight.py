"""Before a start: what would make it fail, or run a TD without the protection asked for.

Each problem is one sentence naming its remedy. Every fact comes from the host that
runs the TD (tdxvirt.facts): this machine's sysfs, firmware and files for a local
URI; that host's libvirt (node devices, domain capabilities, storage volumes) for a
remote one, where what libvirt cannot tell (an unbound driver, a file in no storage
pool, CC modes) is left to the start itself.
"""

from __future__ import annotations

from ..domain.domainxml import DomainXML, read_domain_xml
from ..domain.td_rules import td_problems
from ..errors import NotFoundError
from ..facts import HostFacts, facts_for
from ..gpu.ccmode import mode_problems
from ..host import HostRoot
from ..pci import PciAddress
from ..virt.conn import xml_of_listed
from ..virt.networks import interface_problems

VIR_CONNECT_LIST_DOMAINS_ACTIVE = 1


def _hostdev_problems(facts: HostFacts, hostdev, address: str) -> list[str]:
    try:
        device = facts.device(PciAddress.parse(address))
    except NotFoundError:
        return [f"PCI device {address} is not on {facts.where}; {facts.gpu_list_hint()}"]
    if facts.remote and device.driver is None:
        return []  # libvirt names no driver: unbound, or not reported; the start says
    if hostdev.get("managed") != "yes" and device.driver != "vfio-pci":
        return [f"{address} is bound to {device.driver or 'no driver'}, not vfio-pci, and its "
                f"hostdev is unmanaged; run `tdxvirt gpu detach {address}`"]
    return []


def _file_problems(facts: HostFacts, domain: DomainXML) -> list[str]:
    """Firmware and disks the host lacks (unknown ones are left to the start)."""
    problems = []
    loader = domain.loader_path()
    if loader and facts.firmware_exists(loader) is False:
        problems.append(f"firmware {loader} does not exist; install its package "
                        "(TDX: ovmf-inteltdx) or redefine with --ovmf")
    for _, path in domain.disk_files():
        if facts.disk_exists(path) is False:
            problems.append(f"disk image {path} does not exist; restore it or redefine the TD")
    return problems


def _held_by_running(conn, name: str, gpus: tuple[str, ...]) -> list[str]:
    from .tds import read_facts

    problems = []
    for other in conn.listAllDomains(VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        if other.name() == name:
            continue
        xml = xml_of_listed(other)
        shared = set(gpus) & set(read_facts(xml).gpus if xml else ())
        for address in sorted(shared):
            problems.append(f"{address} is in use by running domain {other.name()!r}; "
                            f"stop it first (`tdxvirt stop {other.name()}`)")
    return problems


def start_problems(conn, host: HostRoot | HostFacts, xml: str, read_modes=None) -> list[str]:
    """Problems of the domain whose (inactive or live) XML this is, on the host that
    runs it (``host``: this machine's HostRoot, or that host's facts; see facts_for).
    ``read_modes``: the GPUs' CC mode reader (HostFacts.mode_reader), None: unknown."""
    from .tds import parsable_xml

    host = facts_for(conn, host)  # the host's facts; ``domain`` below: the domain's
    xml = parsable_xml(xml)  # libvirt may write characters XML forbids (issue #18)
    domain = read_domain_xml(xml)
    parsed = DomainXML.of(xml)
    problems = list(td_problems(parsed))
    if domain.tdx and (missing := host.tdx_problem()):
        problems.append(missing)
    for address, hostdev in parsed.pci_hostdevs():
        problems.extend(_hostdev_problems(host, hostdev, address))
    problems.extend(_file_problems(host, parsed))
    problems.extend(interface_problems(conn, host, parsed))
    if read_modes is not None:
        problems.extend(mode_problems(host.device, domain.gpus, domain.tdx, read_modes))
    problems.extend(_held_by_running(conn, domain.name, domain.gpus))
    return problems
