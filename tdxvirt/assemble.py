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
from .paths import state_dir
from .policy import DomainPlan, inspect_image, plan_domain
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
    from .tds import read_facts  # survives a domain whose XML lxml refuses (issue #18)

    holders = {}
    domains = conn.listAllDomains(0)
    for domain, xml in zip(domains, xmls_of_listed(domains)):
        for address in read_facts(xml).gpus if xml else ():
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
    warnings += _checked_images(spec, facts.uri)
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


def _checked_images(spec: TDSpec, uri: str) -> list[str]:
    """The user's --disk / --image read as the declared format (never guessed), and
    refused with a backing file unless --allow-backing-file (tdxvirt.policy.inspect_image).
    A remote URI's disk lives on that host, where this machine cannot read it."""
    if is_remote(uri):
        return []
    if spec.disk:
        return inspect_image(spec.disk, spec.disk_format, "--disk", spec.allow_backing_file)
    if spec.image:
        return inspect_image(spec.image, spec.disk_format, "--image", spec.allow_backing_file)
    return []


QEMU_CONF = "/etc/libvirt/qemu.conf"


@dataclass(frozen=True)
class StorageOwner:
    """Who owns the overlays and seeds tdxvirt creates: root and QEMU's group."""

    gid: int
    group: str | None  # None: QEMU's group is unknown, the files stay root:root
    note: str | None = None  # why it is unknown (shown as a warning)


def storage_owner(host: HostRoot) -> StorageOwner:
    """QEMU's group from the host's qemu.conf: its ``group`` setting, else the commented
    default libvirt's build wrote there (what libvirt then uses), resolved in the host's
    /etc/group (``+N`` is a numeric gid, as in qemu.conf).

    `host setup` sets dynamic_ownership = 0, so libvirt no longer chowns disk files to
    QEMU: the files tdxvirt creates must already be readable by QEMU's group, and by
    nobody else (a seed's user-data may hold secrets, an overlay holds the guest's disk)."""
    from .hostcfg.qemuconf import QemuConf, QemuConfSyntaxError

    def unknown(why: str) -> StorageOwner:
        return StorageOwner(0, None, f"QEMU's group is unknown ({why}): the overlay and seed "
                                     "tdxvirt creates stay root:root, mode 0660/0640; unless QEMU "
                                     "runs as root, `chgrp` them to QEMU's group")

    path = host.path(QEMU_CONF)
    try:
        conf = QemuConf.parse(path.read_bytes(), QEMU_CONF)
    except FileNotFoundError:
        return unknown(f"no {path}")
    except (OSError, QemuConfSyntaxError) as error:
        return unknown(f"{path} is not readable: {getattr(error, 'strerror', None) or error}")
    group = conf.get("group")
    if not isinstance(group, str):
        default = conf.commented_default("group")
        try:
            group = QemuConf.parse(default.text.lstrip("#").lstrip(), QEMU_CONF).get("group") \
                if default is not None else None
        except QemuConfSyntaxError:
            group = None
    if not isinstance(group, str) or not group:
        return unknown(f"{path} names no group")
    if group.startswith("+") and group[1:].isdigit():
        return StorageOwner(int(group[1:]), group)
    gid = _gid_of(host, group)
    if gid is None:
        return unknown(f"group {group!r} of {QEMU_CONF} is not in the host's /etc/group")
    return StorageOwner(gid, group)


def _gid_of(host: HostRoot, group: str) -> int | None:
    try:
        lines = host.path("/etc/group").read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] == group and fields[2].isdigit():
            return int(fields[2])
    if str(host.base) == "/":  # the real host: NSS may know groups /etc/group does not
        import grp

        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            return None
    return None


def _with_warnings(plan: DomainPlan, extra: list[str]) -> DomainPlan:
    from dataclasses import replace

    return replace(plan, warnings=(*plan.warnings, *extra))
