"""From a TDSpec to checked domain XML for one host and one libvirt.

Gathers the facts (libvirt version and capabilities; from the host that runs the TD,
through tdxvirt.facts: its TDX state, GPUs, firmware and disk; tdxvirt's config),
lets :mod:`tdxvirt.domain.policy` decide, renders, and checks the result against TDX's rules
and libvirt's schema. Changes nothing anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config, load_config
from ..domain.policy import DomainPlan, plan_domain
from ..domain.render import render_domain
from ..domain.spec import TDSpec
from ..domain.storage_paths import storage_dir
from ..domain.td_rules import td_problems
from ..errors import InputError, TdxvirtError
from ..facts import HostFacts, facts_for
from ..host import HostRoot
from ..host.nvidia import is_nvswitch, require_gpu
from ..host.pci import PciDevice
from ..virt import dialect as dialects
from ..virt.conn import xmls_of_listed


@dataclass(frozen=True)
class AssembledTD:
    plan: DomainPlan
    xml: str
    schema_checked: bool  # validated here against a local libvirt schema that knows TDX


def gpu_holders(conn) -> dict[str, str]:
    """PCI address -> name of the (first) defined domain whose XML passes it through."""
    return {address: names[0] for address, names in all_gpu_holders(conn).items()}


def all_gpu_holders(conn, running_only: bool = False) -> dict[str, list[str]]:
    """PCI address -> every domain (or every running one) whose XML passes it through."""
    from .tds import read_facts  # survives a domain whose XML lxml refuses (issue #18)

    holders: dict[str, list[str]] = {}
    domains = conn.listAllDomains(1 if running_only else 0)  # VIR_CONNECT_LIST_DOMAINS_ACTIVE
    for domain, xml in zip(domains, xmls_of_listed(domains)):
        for address in read_facts(xml).gpus if xml else ():
            holders.setdefault(address, []).append(domain.name())
    return holders


def select_devices(facts: HostFacts | HostRoot, spec: TDSpec) -> tuple[list[PciDevice], list[PciDevice], list[str]]:
    """The GPUs and (for --ppcie) the board's NVSwitches, with warnings. A HostRoot
    stands for this machine's facts."""
    if not isinstance(facts, HostFacts):
        from ..facts.local import LocalFacts

        facts = LocalFacts(facts, "")
    warnings = []
    gpus = [facts.device(address) for address in spec.gpus]
    for gpu in gpus:
        require_gpu(gpu)
    check_gpu_mode(gpus, spec.ppcie)
    if not spec.ppcie:
        return gpus, [], warnings
    board = facts.nvidia_devices()
    switches = [d for d in board if is_nvswitch(d)]
    board_gpus = [d for d in board if not is_nvswitch(d)]
    if not switches:
        raise InputError(f"--ppcie: no NVSwitch found on {facts.where}; protected PCIe is for "
                         "HGX boards with NVSwitches (a single GPU uses CC mode)")
    if not gpus:
        gpus = board_gpus
    elif {g.address for g in gpus} != {g.address for g in board_gpus}:
        warnings.append(f"--ppcie with {len(gpus)} of the board's {len(board_gpus)} GPUs: "
                        "NVIDIA's protected PCIe mode expects all of them in one TD")
    return gpus, [s for s in switches if s.address not in spec.gpus], warnings


# NVIDIA's multi-GPU passthrough (MPT, driver R590+): a Blackwell TD takes 1, 2, 4 or 8
# GPUs, each in CC mode, and no NVSwitch (on HGX B200/B300 the switches are managed on
# the host, through ConnectX functions, by Fabric Manager and the NVLink subnet manager).
MPT_GPU_COUNTS = (1, 2, 4, 8)


def check_gpu_mode(devices: list[PciDevice], ppcie: bool) -> None:
    """One confidential-computing mode per TD: Hopper's CC (one GPU) or protected PCIe
    (--ppcie: the board's GPUs and NVSwitches), or Blackwell's CC / multi-GPU passthrough.
    Mixing generations fails attestation; each refusal says why."""
    from ..host.nvidia import BLACKWELL_GEN, generation, model_name

    by_generation: dict[str, list[PciDevice]] = {}
    for device in devices:
        if (found := generation(device)) is not None:
            by_generation.setdefault(found, []).append(device)
    if len(by_generation) > 1:
        named = "; ".join(f"{gen}: " + ", ".join(f"{d.address} ({model_name(d)})" for d in members)
                          for gen, members in sorted(by_generation.items()))
        raise InputError(f"GPUs of two generations in one TD ({named}): NVIDIA's confidential "
                         "computing attests one mode per TD; define one TD per generation")
    blackwell = by_generation.get(BLACKWELL_GEN, [])
    if not blackwell:
        return
    if ppcie:
        raise InputError("--ppcie is Hopper's protected PCIe mode; Blackwell GPUs go into one TD "
                         "by multi-GPU passthrough, each in CC mode and without NVSwitches: drop "
                         "--ppcie and set CC on every GPU (`tdxvirt gpu cc-mode BDF... --set on`)")
    if switches := [d for d in devices if is_nvswitch(d)]:
        raise InputError(f"{', '.join(str(d.address) for d in switches)}: no NVSwitch goes into a "
                         "Blackwell TD (multi-GPU passthrough); Fabric Manager manages the "
                         "switches on the host: pass only the GPUs")
    if len(blackwell) not in MPT_GPU_COUNTS:
        raise InputError(f"{len(blackwell)} Blackwell GPUs: NVIDIA's multi-GPU passthrough takes "
                         f"{', '.join(map(str, MPT_GPU_COUNTS[:-1]))} or {MPT_GPU_COUNTS[-1]} GPUs "
                         "per TD; give that many --gpu")


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


def resolve_loader(spec: TDSpec, config: Config, facts: HostFacts | HostRoot, dialect: str,
                   builds: dict | None = None) -> str | None:
    """--ovmf, else the config file, else the recorded build, else the host's TDX
    firmware (this machine: its QEMU descriptors; another host: None, libvirt picks
    it there). ``config`` holds paths already chosen for this host (paths_from_config)."""
    explicit = spec.ovmf or config.ovmf
    if explicit or dialect == "plain":  # plain VMs let libvirt pick standard OVMF
        return explicit
    if builds and "ovmf" in builds:
        return builds["ovmf"].path
    if not isinstance(facts, HostFacts):
        from ..facts.local import LocalFacts

        facts = LocalFacts(facts, "")
    return facts.tdx_firmware(dialect)


def resolve_emulator(spec: TDSpec, config: Config, builds: dict) -> str | None:
    """--qemu, else the config file, else the recorded build, else libvirt's default."""
    if spec.qemu or config.qemu:
        return spec.qemu or config.qemu
    return builds["qemu"].path if "qemu" in builds else None


def _overlay_dir(spec: TDSpec, config: Config, facts: HostFacts) -> str | None:
    """Where the files tdxvirt creates for a TD (overlay, cloud-init seed) go."""
    if not spec.image and not spec.cloud_init:
        return None
    if facts.remote:
        raise InputError("--image and --cloud-init create files on this machine, but the URI "
                         "is remote; create them on that host and pass the disk with --disk")
    return storage_dir(config)


def assemble_td(conn, host: HostRoot | HostFacts, spec: TDSpec,
                config: Config | None = None, check_schema: bool = True) -> AssembledTD:
    """``host``: this machine's HostRoot (used only when the URI names no host), or the
    host's facts already chosen (tdxvirt.facts.facts_for). ``check_schema=False`` when
    libvirt is about to validate the XML itself (define's VIR_DOMAIN_DEFINE_VALIDATE,
    against the schema of the libvirt that will run the TD): loading domain.rng here
    costs a define ~10 ms for the same answer."""
    config = config or load_config()
    libvirt = dialects.probe(conn, spec.virt_type)
    facts = facts_for(conn, host, libvirt.uri)
    if spec.tdx:
        dialect = dialects.choose(spec.dialect, libvirt, facts.tdx_enabled())
    else:
        dialect = "plain"
    overlay_dir = _overlay_dir(spec, config, facts)
    gpus, switches, warnings = select_devices(facts, spec)
    from dataclasses import replace

    from ..virt import networks

    network, network_warnings = networks.resolve(conn, libvirt.uri, facts, spec.network,
                                                 spec.ssh_keys, spec.vsock)
    spec = replace(spec, network=network)
    warnings += network_warnings
    _check_not_shared(conn, spec, [*gpus, *switches])
    warnings += facts.check_disk(spec)
    ovmf, qemu, config_warnings = facts.paths_from_config(config)
    warnings += config_warnings
    for_host = Config(ovmf=ovmf, qemu=qemu, overlay_dir=config.overlay_dir)
    builds = facts.recorded_builds()
    plan = plan_domain(
        spec, gpus=gpus, switches=switches, dialect=dialect, libvirt_version=libvirt.version,
        loader=resolve_loader(spec, for_host, facts, dialect, builds),
        emulator=resolve_emulator(spec, for_host, builds),
        overlay_dir=overlay_dir,
    )
    if warnings:
        plan = _with_warnings(plan, warnings)
    from uuid import uuid4

    # chosen here, not by libvirt, so root's record and tdxvirt's metadata name it
    plan = replace(plan, uuid=str(uuid4()))
    if plan.tdx and plan.loader and not facts.remote:
        from ..domain.tdvf import predicted_mrtd

        plan = replace(plan, mrtd=predicted_mrtd(facts.host.path(plan.loader)))
    if plan.tdx and plan.kernel and plan.loader and not facts.remote:
        plan = _with_secure_boot_check(plan, facts)
    xml = render_domain(plan)
    if plan.tdx and plan.kernel and not facts.remote:
        plan, xml = _with_boot_measurements(plan, xml, facts, conn)
    problems = td_problems(xml)
    if problems:  # the template broke TDX's rules: tdxvirt's bug, never the user's
        raise TdxvirtError(f"internal error: generated TD breaks TDX rules: {problems[0]}")
    if not check_schema:
        return AssembledTD(plan=plan, xml=xml, schema_checked=False)
    from ..virt.schema import validate_domain_xml

    return AssembledTD(plan=plan, xml=xml, schema_checked=validate_domain_xml(xml))


def _with_secure_boot_check(plan: DomainPlan, facts: HostFacts) -> DomainPlan:
    """A directly booted kernel on a firmware that enforces Secure Boot: refused when it
    is unsigned (it would never start), a warning when it is signed (only a signer in the
    firmware's db starts it). Files that cannot be read here are left to `measure`."""
    from ..domain.bootmeasure import secure_boot_problem
    from ..domain.tdvf import FIRMWARE_LIMIT
    from ..userfile import read_user_file

    try:
        firmware = read_user_file(facts.host.path(plan.loader), "firmware", limit=FIRMWARE_LIMIT)
        kernel = read_user_file(facts.host.path(plan.kernel), "kernel", limit=FIRMWARE_LIMIT)
    except TdxvirtError:
        return plan
    refusal, warning = secure_boot_problem(firmware, kernel, plan.loader, plan.kernel)
    if refusal:
        raise InputError(f"--kernel: {refusal}")
    return _with_warnings(plan, [warning]) if warning else plan


def _with_boot_measurements(plan: DomainPlan, xml: str, facts: HostFacts, conn) -> tuple[DomainPlan, str]:
    """The plan and XML with the RTMR1/RTMR2 a directly booted kernel will give, where
    they are predictable (tdxvirt.domain.measure decides from the rendered domain: its kernel,
    initrd, command line, firmware and option ROMs); unchanged otherwise."""
    from dataclasses import replace

    from ..domain.measure import is_prediction, predict_boot
    from ..virt.conn import qemu_version

    def here(path: str) -> str:
        return str(facts.host.path(path))

    boot = predict_boot(xml, here(plan.loader) if plan.loader else None, here,
                        qemu_version=qemu_version(conn))
    values = {k: v for k, v in (("rtmr1", boot.rtmr1), ("rtmr2", boot.rtmr2)) if is_prediction(v)}
    if not values:
        return plan, xml
    plan = replace(plan, **values)
    return plan, render_domain(plan)


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
    from ..hostcfg.qemuconf import QemuConf, QemuConfSyntaxError

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
