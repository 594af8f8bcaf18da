"""From a TDSpec to checked domain XML for one host and one libvirt.

Gathers the facts (libvirt version and capabilities, host TDX state, GPU sysfs data,
firmware, config), lets :mod:`tdxvirt.policy` decide, renders, and checks the result
against TDX's rules and libvirt's schema. Changes nothing anywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import dialect as dialects
from .config import Config, load_config
from .conn import is_remote, xmls_of_listed
from .errors import InputError, TdxvirtError
from .host import HostRoot
from .host.firmware import find_tdx_ovmf
from .host.nvidia import is_nvswitch, nvidia_devices, require_gpu
from .host.pci import PciDevice, read_device
from .metadata import read_domain_xml
from .paths import state_dir
from .policy import DomainPlan, plan_domain
from .render import render_domain
from .schema import validate_domain_xml
from .spec import TDSpec
from .td_rules import td_problems

LIBVIRT_IMAGES = "/var/lib/libvirt/images"


@dataclass(frozen=True)
class AssembledTD:
    plan: DomainPlan
    xml: str
    schema_checked: bool


def gpu_holders(conn) -> dict[str, str]:
    """PCI address -> name of the defined domain whose XML passes it through."""
    holders = {}
    domains = conn.listAllDomains(0)
    for domain, xml in zip(domains, xmls_of_listed(domains)):
        for address in read_domain_xml(xml).gpus if xml else ():
            holders.setdefault(address, domain.name())
    return holders


def select_devices(host: HostRoot, spec: TDSpec) -> tuple[list[PciDevice], list[PciDevice], list[str]]:
    """The GPUs and (for --ppcie) the board's NVSwitches, with warnings."""
    warnings = []
    gpus = [read_device(host, address) for address in spec.gpus]
    for gpu in gpus:
        require_gpu(gpu)
    if not spec.ppcie:
        return gpus, [], warnings
    board = nvidia_devices(host)
    switches = [d for d in board if is_nvswitch(d)]
    board_gpus = [d for d in board if not is_nvswitch(d)]
    if not switches:
        raise InputError("--ppcie: no NVSwitch found on this host; protected PCIe is for "
                         "HGX boards with NVSwitches (a single GPU uses CC mode)")
    if not gpus:
        gpus = board_gpus
    elif {g.address for g in gpus} != {g.address for g in board_gpus}:
        warnings.append(f"--ppcie with {len(gpus)} of the board's {len(board_gpus)} GPUs: "
                        "NVIDIA's protected PCIe mode expects all of them in one TD")
    return gpus, [s for s in switches if s.address not in spec.gpus], warnings


def _check_not_shared(conn, spec: TDSpec, devices: list[PciDevice]) -> None:
    if spec.allow_shared or not devices:
        return
    holders = gpu_holders(conn)
    for device in devices:
        holder = holders.get(str(device.address))
        if holder and holder != spec.name:
            raise InputError(
                f"{device.address} is already given to domain {holder!r}; undefine it first "
                f"(`tdxvirt undefine {holder}`), pick another GPU, or pass --allow-shared "
                "if only one of them will ever run"
            )


def recorded_builds(uri: str) -> dict:
    """What `tdxvirt build` recorded on this machine (nothing for a remote URI)."""
    if is_remote(uri):
        return {}
    from .build.artifacts import recorded

    return recorded()


def resolve_loader(spec: TDSpec, config: Config, host: HostRoot, dialect: str,
                   builds: dict | None = None) -> str | None:
    """--ovmf, else the config file, else the recorded build, else the descriptors."""
    explicit = spec.ovmf or config.ovmf
    if explicit or dialect == "plain":  # plain VMs let libvirt pick standard OVMF
        return explicit
    if builds and "ovmf" in builds:
        return builds["ovmf"].path
    return find_tdx_ovmf(host)


def resolve_emulator(spec: TDSpec, config: Config, builds: dict) -> str | None:
    """--qemu, else the config file, else the recorded build, else libvirt's default."""
    if spec.qemu or config.qemu:
        return spec.qemu or config.qemu
    return builds["qemu"].path if "qemu" in builds else None


def _overlay_dir(spec: TDSpec, config: Config, uri: str) -> str | None:
    """Where the files tdxvirt creates for a TD (overlay, cloud-init seed) go."""
    if not spec.image and not spec.cloud_init:
        return None
    if is_remote(uri):
        raise InputError("--image and --cloud-init create files on this machine, but the URI "
                         "is remote; create them on that host and pass the disk with --disk")
    return storage_dir(config)


def storage_dir(config: Config) -> str:
    """The directory of this machine where tdxvirt creates overlays and seeds; also the
    only directory `undefine --remove-storage` deletes from (tdxvirt.storage_paths)."""
    if config.overlay_dir:
        return config.overlay_dir
    return LIBVIRT_IMAGES if os.path.isdir(LIBVIRT_IMAGES) else str(state_dir() / "images")


def assemble_td(conn, host: HostRoot, spec: TDSpec, config: Config | None = None) -> AssembledTD:
    config = config or load_config()
    facts = dialects.probe(conn, spec.virt_type)
    if spec.tdx:
        host_tdx = None if is_remote(facts.uri) else dialects.host_tdx_enabled(host)
        dialect = dialects.choose(spec.dialect, facts, host_tdx)
    else:
        dialect = "plain"
    gpus, switches, warnings = select_devices(host, spec)
    _check_not_shared(conn, spec, [*gpus, *switches])
    builds = recorded_builds(facts.uri)
    plan = plan_domain(
        spec, gpus=gpus, switches=switches, dialect=dialect, libvirt_version=facts.version,
        loader=resolve_loader(spec, config, host, dialect, builds),
        emulator=resolve_emulator(spec, config, builds),
        overlay_dir=_overlay_dir(spec, config, facts.uri),
    )
    if warnings:
        plan = _with_warnings(plan, warnings)
    xml = render_domain(plan)
    problems = td_problems(xml)
    if problems:  # the template broke TDX's rules: tdxvirt's bug, never the user's
        raise TdxvirtError(f"internal error: generated TD breaks TDX rules: {problems[0]}")
    return AssembledTD(plan=plan, xml=xml, schema_checked=validate_domain_xml(xml))


def _with_warnings(plan: DomainPlan, extra: list[str]) -> DomainPlan:
    from dataclasses import replace

    return replace(plan, warnings=(*plan.warnings, *extra))
