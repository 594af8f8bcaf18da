"""What the user asked for: a TD spec, validated field by field.

A TDSpec holds intent only (parsed and checked user input). Decisions that depend on
the host (firmware path, MMIO window, alignment) are made in :mod:`tdxvirt.domain.policy`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import InputError
from ..pci import PciAddress
from ..units import MIB, parse_size
from .tdx_options import POLICY_DEBUG, QuoteService, parse_measurement, parse_policy, parse_qgs

# Stricter than libvirt (which only forbids '/'): a name users can type in a shell,
# that is safe in file names and needs no quoting in virsh.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")

DEFAULT_VCPUS = 4
DEFAULT_MEMORY = "16G"
MAX_VCPUS = 1024
# bit 28: SEPT #VE disable, the default every TDX stack uses; bit 0: debug.
DEFAULT_POLICY = 0x10000000


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InputError(
            f"invalid TD name {name!r}: use 1 to 64 letters, digits, '.', '_', '+' "
            "or '-', starting with a letter or digit"
        )
    return name


def default_name(gpus: tuple[PciAddress, ...]) -> str:
    """A readable name from the first GPU: ``td-38-00-0`` (``-x2`` for two GPUs)."""
    if not gpus:
        return "td"
    first = gpus[0].short.replace(":", "-").replace(".", "-")
    return f"td-{first}" if len(gpus) == 1 else f"td-{first}-x{len(gpus)}"


def parse_gpus(values: tuple[str, ...] | list[str]) -> tuple[PciAddress, ...]:
    gpus = tuple(PciAddress.parse(v) for v in values)
    seen: set[PciAddress] = set()
    for gpu in gpus:
        if gpu in seen:
            raise InputError(f"GPU {gpu} is given twice; pass each --gpu once")
        seen.add(gpu)
    return gpus


def validate_vcpus(vcpus: int) -> int:
    if isinstance(vcpus, bool) or not isinstance(vcpus, int) or not 1 <= vcpus <= MAX_VCPUS:
        raise InputError(f"invalid --vcpus {vcpus!r}: use a whole number from 1 to {MAX_VCPUS}")
    return vcpus


def validate_existing_file(path: str, option: str, is_file=os.path.isfile) -> str:
    """An absolute path to an existing regular file (libvirt needs absolute paths);
    ``is_file`` looks on the host that runs the TD (a whole host in a root of its own)."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise InputError(f"{option} {path!r}: not a usable path")
    absolute = os.path.abspath(path)
    if not is_file(absolute):
        raise InputError(f"{option} {path!r}: no such file; give the path of an existing file")
    return absolute


DIALECTS = ("native", "canonical", "qemu-args")
# --network as virt-install spells it; stored as "none", "user", "network=NAME",
# "bridge=BR", or "auto" (the command line's default: libvirt's 'default' network when
# the host has one, else none; resolved by tdxvirt.virt.networks where libvirt answers).
NETWORK_WORDS = ("none", "default", "user", "auto")
# libvirt's network names and Linux's bridge names (IFNAMSIZ 16: 15 characters)
_NETWORK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+:-]{0,63}")
_BRIDGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,14}")


def parse_network(value: str) -> str:
    """--network none | default | user | network=NAME | bridge=BR (virt-install's words)."""
    text = (value or "").strip()
    if text in NETWORK_WORDS:
        return "network=default" if text == "default" else text
    kind, _, source = text.partition("=")
    pattern = {"network": _NETWORK_NAME, "bridge": _BRIDGE_NAME}.get(kind)
    if pattern is None:
        raise InputError(f"invalid --network {value!r}: give none, default, user, "
                         "network=NAME (a libvirt network) or bridge=BR (a host bridge)")
    if not pattern.fullmatch(source):
        what = "a libvirt network name" if kind == "network" else \
            "a bridge name of at most 15 letters, digits, '.', '_', ':' or '-'"
        raise InputError(f"invalid --network {value!r}: {source!r} is not {what}")
    return f"{kind}={source}"
HUGEPAGES = {"2M": 2048, "1G": 1048576}
# Formats of a user-given --disk / --image: declared, never guessed from the content.
DISK_FORMATS = ("raw", "qcow2")  # KiB, as libvirt's <page size=...> wants
DEFAULT_SSH_PORT = 10022  # Canonical's TD scripts forward host 10022 to guest 22


def validate_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InputError(f"invalid --ssh-port {port!r}: use a TCP port from 1 to 65535")
    return port


def _choice(value: str | None, choices, option: str) -> str | None:
    if value is not None and value not in choices:
        raise InputError(f"invalid {option} {value!r}: use one of {', '.join(choices)}")
    return value


def with_clearcpuid(cmdline: str) -> str:
    """The kernel arguments with clearcpuid=mtrr, which TD guests need (source document)."""
    if "clearcpuid=mtrr" in cmdline.split():
        return cmdline
    return f"{cmdline} clearcpuid=mtrr".strip()


@dataclass(frozen=True)
class TDSpec:
    name: str
    gpus: tuple[PciAddress, ...]
    vcpus: int = DEFAULT_VCPUS
    memory: int = 16 * 1024 * MIB  # bytes
    tdx: bool = True  # False: the same VM without launch security ("plain")
    dialect: str | None = None  # None: chosen from the target libvirt
    policy: int = DEFAULT_POLICY
    mr_config_id: str | None = None
    mr_owner: str | None = None
    mr_owner_config: str | None = None
    qgs: QuoteService | None = None
    image: str | None = None  # base image: the TD boots a new qcow2 overlay on it
    disk: str | None = None  # image used as is
    disk_format: str = "raw"  # of --disk, or of --image's base (never guessed; libvirt's default)
    allow_backing_file: bool = False  # accept a --disk / --image that has a backing file
    ovmf: str | None = None  # None: from config, build artifacts or firmware descriptors
    qemu: str | None = None  # None: from config, build artifacts or libvirt's default
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    managed: bool = True
    allow_shared: bool = False
    ppcie: bool = False
    network: str = "none"
    ssh_port: int = DEFAULT_SSH_PORT
    vsock: bool = False
    hugepages: str | None = None
    numa_auto: bool = False
    virt_type: str = "kvm"
    cloud_init: bool = False  # attach a NoCloud seed prepared for an H100 in CC mode
    ssh_keys: tuple[str, ...] = ()
    imex_channel: bool = False  # the first boot creates NVIDIA's IMEX channel 0
    user_data: str | None = None  # the user's own user-data, replacing tdxvirt's
    mmio_window: int | None = None  # bytes; None: sized from the devices' BARs
    qemu_args: tuple[str, ...] = ()  # the user's own QEMU arguments, recorded with the TD
    os_id: str | None = None  # libosinfo's id of the guest OS (--os-variant); None: generic Linux

    @classmethod
    def from_user(cls, *, name: str | None, gpus=(), vcpus: int = DEFAULT_VCPUS,
                  memory: str = DEFAULT_MEMORY, tdx: bool = True, dialect: str | None = None,
                  policy: str | None = None, debug: bool = False,
                  mr_config_id: str | None = None, mr_owner: str | None = None,
                  mr_owner_config: str | None = None, qgs: str | None = None,
                  image: str | None = None, disk: str | None = None,
                  disk_format: str | None = None, image_format: str | None = None,
                  allow_backing_file: bool = False,
                  ovmf: str | None = None, qemu: str | None = None,
                  kernel: str | None = None, initrd: str | None = None,
                  cmdline: str | None = None, managed: bool = True,
                  allow_shared: bool = False, ppcie: bool = False, network: str = "none",
                  ssh_port: int = DEFAULT_SSH_PORT, vsock: bool = False,
                  hugepages: str | None = None, numa: str | None = None,
                  virt_type: str = "kvm", cloud_init: bool = False, ssh_key=(),
                  user_data: str | None = None, imex_channel: bool = False,
                  mmio_window: str | None = None,
                  qemu_arg=(), os_variant: str | None = None,
                  remote: bool = False, is_file=None) -> "TDSpec":
        """Parse and check everything the user typed; raise InputError naming the field.

        ``remote``: the TD runs on another host (tdxvirt.virt.conn.is_remote), where the
        files named (--disk, --ovmf, --qemu, --kernel, --initrd) are that host's: they
        must be absolute and are not looked for on this machine (define asks libvirt
        for the disk; the rest libvirt opens at the start). ``is_file``: whether a path is
        a file on the host that runs the TD, when that host lives in a root of its own
        (the simulated host); else this machine's."""
        if remote:
            _file = _remote_file
        else:
            def _file(path, option):
                return _local_file(path, option, is_file or os.path.isfile)
        addresses = parse_gpus(gpus)
        if name is None and not addresses and not ppcie:
            raise InputError("give the TD a NAME, or at least one --gpu to derive it from")
        if image and disk:
            raise InputError("give either --image (boot a new overlay on it) or --disk (use as is), not both")
        fmt = _disk_format(disk, image, disk_format, image_format, allow_backing_file)
        if (initrd or cmdline) and not kernel:
            raise InputError("--initrd and --cmdline need --kernel (direct kernel boot)")
        parsed_policy = DEFAULT_POLICY if policy is None else parse_policy(policy)
        if not tdx and (policy or debug or mr_config_id or mr_owner or mr_owner_config or qgs
                        or dialect):
            raise InputError("TDX options (--policy, --debug, --mr-*, --qgs, --dialect) "
                             "make no sense with --no-tdx; drop them or drop --no-tdx")
        if tdx and hugepages:
            # QEMU gives a TD's private memory from guest_memfd (4 KiB pages; backends/
            # hostmem.c sets RAM_GUEST_MEMFD for confidential guests, system/physmem.c
            # ram_block_add creates the guest_memfd beside the backend's own memory).
            # A hugetlbfs backend would back only the shared side and reserve the
            # whole size a second time in huge pages.
            raise InputError("--hugepages backs only a TD's shared memory (its private memory "
                             "is guest_memfd) and would reserve the memory twice; drop "
                             "--hugepages, or use it with --no-tdx")
        if numa not in (None, "auto"):
            raise InputError(f"invalid --numa {numa!r}: the only placement is 'auto'")
        name = validate_name(name if name is not None else default_name(addresses))
        keys, own_user_data = _first_boot(name, ssh_key, user_data)
        if imex_channel and own_user_data is not None:
            raise InputError("--imex-channel goes into tdxvirt's user-data, which --user-data "
                             "replaces: put `options nvidia NVreg_CreateImexChannel0=1` in a "
                             "modprobe.d file of your own user-data, or leave out --user-data")
        return cls(
            name=name,
            gpus=addresses,
            vcpus=validate_vcpus(vcpus),
            memory=parse_size(memory, "--memory"),
            tdx=tdx,
            dialect=_choice(dialect, DIALECTS, "--dialect"),
            policy=parsed_policy | (POLICY_DEBUG if debug else 0),
            mr_config_id=None if mr_config_id is None else parse_measurement(mr_config_id, "--mr-config-id"),
            mr_owner=None if mr_owner is None else parse_measurement(mr_owner, "--mr-owner"),
            mr_owner_config=(None if mr_owner_config is None
                             else parse_measurement(mr_owner_config, "--mr-owner-config")),
            qgs=None if qgs is None else parse_qgs(qgs),
            image=_file(image, "--image"),
            disk=_file(disk, "--disk"),
            disk_format=fmt,
            allow_backing_file=bool(allow_backing_file),
            ovmf=_file(ovmf, "--ovmf"),
            qemu=_file(qemu, "--qemu"),
            kernel=_file(kernel, "--kernel"),
            initrd=_file(initrd, "--initrd"),
            cmdline=None if kernel is None else with_clearcpuid(_one_line(cmdline or "", "--cmdline")),
            managed=managed,
            allow_shared=allow_shared,
            ppcie=ppcie,
            network=parse_network(network),
            ssh_port=validate_port(ssh_port),
            vsock=vsock,
            hugepages=_choice(hugepages, tuple(HUGEPAGES), "--hugepages"),
            numa_auto=numa == "auto",
            virt_type=_choice(virt_type, ("kvm", "qemu"), "--virt-type"),
            cloud_init=bool(cloud_init or ssh_key or user_data or imex_channel),
            ssh_keys=keys,
            imex_channel=bool(imex_channel),
            user_data=own_user_data,
            mmio_window=None if mmio_window is None else parse_size(mmio_window, "--mmio-window"),
            qemu_args=_qemu_args(qemu_arg, tdx),
            os_id=None if os_variant is None else _os_id(os_variant),
        )


def _os_id(short_id: str) -> str:
    from ..guest.osinfo import os_id

    return os_id(short_id)


# Options that would change what makes the domain a TD (QEMU applies <qemu:commandline>
# after libvirt's own arguments): never accepted as the user's own, recorded or not.
_TD_OVERRIDES = ("-machine", "-M", "-object", "-readconfig", "-set", "-global", "-accel",
                 "-cpu", "-bios", "-pflash", "-drive", "-incoming", "-loadvm")


def _qemu_args(args, tdx: bool) -> tuple[str, ...]:
    """--qemu-arg values: the user's own QEMU arguments, in order, recorded with the TD
    (integrity accepts exactly these); none that could change its protection."""
    args = tuple(args or ())
    for arg in args:
        _one_line(arg, "--qemu-arg")
        if not arg.strip():
            raise InputError("--qemu-arg '' is empty; give one word of a QEMU argument each time")
        if tdx and arg.split("=", 1)[0] in _TD_OVERRIDES:
            raise InputError(f"--qemu-arg {arg!r} would change what QEMU makes of the TD (its machine, "
                             "objects, CPU, firmware or memory) behind libvirt's TDX launch security; "
                             "give that through tdxvirt's own options, or define with --no-tdx")
    return args


def _disk_format(disk, image, disk_format, image_format, allow_backing_file) -> str:
    """The declared format of --disk (--disk-format) or --image (--image-format)."""
    if disk_format is not None and not disk:
        raise InputError("--disk-format is the format of --disk; give --disk, or use "
                         "--image-format with --image")
    if image_format is not None and not image:
        raise InputError("--image-format is the format of --image; give --image, or use "
                         "--disk-format with --disk")
    if allow_backing_file and not (disk or image):
        raise InputError("--allow-backing-file applies to --disk or --image; give one of them")
    _choice(disk_format, DISK_FORMATS, "--disk-format")
    _choice(image_format, DISK_FORMATS, "--image-format")
    return disk_format or image_format or "raw"


def _first_boot(name: str, ssh_key_files, user_data_file) -> tuple[tuple[str, ...], str | None]:
    """Read and check --ssh-key / --user-data now, so bad input fails before anything."""
    if not ssh_key_files and not user_data_file:
        return (), None
    from ..guest.seed import plan_seed
    from ..guest.userdata import hostname_for, read_ssh_key_file, read_user_data_file

    keys = tuple(k for path in ssh_key_files for k in read_ssh_key_file(path))
    own = None if user_data_file is None else read_user_data_file(user_data_file)
    plan_seed(hostname=hostname_for(name), ssh_keys=keys, user_data=own)  # checks, writes nothing
    return keys, own


def _local_file(path: str | None, option: str, is_file=os.path.isfile) -> str | None:
    return None if path is None else validate_existing_file(path, option, is_file)


def _remote_file(path: str | None, option: str) -> str | None:
    """A path on the host that runs the TD: absolute, never looked for here."""
    if path is None:
        return None
    if not isinstance(path, str) or not path or "\0" in path or "\n" in path or "\r" in path:
        raise InputError(f"{option} {path!r}: not a usable path")
    if not os.path.isabs(path):
        raise InputError(f"{option} {path!r}: give the absolute path of the file on the host "
                         "that runs the TD (a relative path means nothing there)")
    return os.path.normpath(path)


def _one_line(text: str, option: str) -> str:
    if any(c in text for c in "\0\n\r"):
        raise InputError(f"invalid {option}: it must be one line of text")
    return text.strip()
