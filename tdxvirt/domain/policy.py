"""Every decision between a TDSpec and the domain XML, in one place.

Templates receive a finished :class:`DomainPlan` and only loop and branch over it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from .. import __version__
from ..errors import HostNotReadyError, InputError
from ..guest.osinfo import DEFAULT_OS
from ..host.pci import PciDevice
from ..pci import PciAddress
from ..units import MIB, human
from ..virt.dialect import LIBVIRT_NATIVE_TDX, version_text  # noqa: F401  (re-exported)
from .domainxml import MMIO_FWCFG
from .spec import HUGEPAGES, TDSpec

LIBVIRT_HOSTDEV_IOMMUFD = 12_001_000

# TDX memory should be 2 MiB aligned: less costs measured performance (Canonical).
MEMORY_ALIGN = 2 * MIB
# OVMF's own default 64-bit MMIO window; never ask for less.
MIN_MMIO_MB = 32 * 1024
# A window this large was reported to break the iommufd bind of Blackwell GPUs (2 TiB
# worked for 4 B200s in the same report); said, not refused: the BARs need what they need.
LARGE_MMIO_MB = 8 * 1024 * 1024
WIDE_ADDRESS_MMIO_MB = 1024 * 1024  # 1 TiB: four B200s need 2 TiB (DomainPlan.wide_address_mb)
# The only fw_cfg name OVMF reads for the window (X-PciMmio64 is silently ignored).
# libvirt's qemu driver refuses opt/ovmf/ names in <sysinfo type='fwcfg'> ("That
# firmware name is reserved"; its test driver accepts them), so the entry goes to
# QEMU as -fw_cfg through <qemu:commandline>, in every dialect.


@dataclass(frozen=True)
class Hostdev:
    source: PciAddress
    guest_bus: int  # index of the pcie-root-port it sits on
    kind: str = "gpu"  # or "nvswitch"


@dataclass(frozen=True)
class Disk:
    path: str
    format: str
    overlay_base: str | None = None  # set when tdxvirt creates path as an overlay
    base_format: str | None = None


@dataclass(frozen=True)
class DomainPlan:
    name: str
    dialect: str  # native, canonical, qemu-args or plain
    virt_type: str
    vcpus: int
    memory_kib: int
    loader: str | None
    emulator: str | None
    mmio_mb: int
    policy_hex: str
    mr_config_id: str | None
    mr_owner: str | None
    mr_owner_config: str | None
    qgs_path: str | None
    qgs_vsock: tuple[int, int] | None
    hostdevs: tuple[Hostdev, ...]
    managed: bool
    iommufd: bool
    split_irqchip: bool
    disk: Disk | None
    kernel: str | None
    initrd: str | None
    cmdline: str | None
    network: str
    ssh_port: int
    vsock: bool
    hugepage_kib: int | None
    numa_nodeset: str | None
    seed: str | None = None  # the cloud-init seed ISO tdxvirt creates
    qemu_args: tuple[str, ...] = ()
    mrtd: str | None = None  # predicted from the firmware at define (tdxvirt.domain.tdvf), single pass
    rtmr1: str | None = None  # predicted at define for a directly booted kernel (tdxvirt.domain.measure)
    rtmr2: str | None = None
    tdxvirt_version: str = __version__
    warnings: tuple[str, ...] = field(default=())
    uuid: str | None = None  # chosen at define, so the root-owned record can be keyed by it
    os_id: str = DEFAULT_OS  # libosinfo's id of the guest OS (virt-manager's OS and defaults)

    @property
    def wide_address_mb(self) -> int:
        """From this window up the TD gets the host's physical address width (the template's
        <maxphysaddr mode='passthrough'/>): TDs of more than three Blackwell GPUs were
        reported failing on too few guest physical-address bits."""
        return WIDE_ADDRESS_MMIO_MB

    @property
    def title(self) -> str:
        """What GUIs list: the name first (virt-manager cuts long titles)."""
        return f"{self.name} [TDX]"

    @property
    def tdx(self) -> bool:
        return self.dialect != "plain"

    @property
    def root_ports(self) -> tuple[int, ...]:
        return tuple(h.guest_bus for h in self.hostdevs)

    @property
    def gpus(self) -> tuple[Hostdev, ...]:
        return tuple(h for h in self.hostdevs if h.kind == "gpu")

    @property
    def network_kind(self) -> str:
        """none, user, network or bridge (spec.parse_network; 'auto' is resolved by then)."""
        return self.network.partition("=")[0]

    @property
    def network_source(self) -> str:
        """The libvirt network's or the bridge's name ('' for none and user)."""
        return self.network.partition("=")[2]


def align_memory(size: int) -> tuple[int, str | None]:
    aligned = -(-size // MEMORY_ALIGN) * MEMORY_ALIGN
    if aligned == size:
        return size, None
    return aligned, f"memory {size} bytes rounded up to {human(aligned)} (TDs want 2 MiB alignment)"


def window_mb_for(size_mb: int) -> int:
    """The MMIO window (MiB) for ``size_mb`` of BARs: a power of two, at least OVMF's 32G."""
    window = MIN_MMIO_MB
    while window < size_mb:
        window *= 2
    return window


def mmio_window_mb(devices: list[PciDevice]) -> int | None:
    """Sum of the passed devices' memory BARs, rounded up to a power of two, in MiB;
    None when a device's BAR sizes are unknown (a remote host's device tdxvirt's table
    of known GPUs lacks)."""
    sizes = [d.mmio_bytes for d in devices]
    if any(size is None for size in sizes):
        return None
    return window_mb_for(-(-sum(sizes) // MIB))


def plan_mmio(devices: list[PciDevice], requested: int | None) -> tuple[int, str | None]:
    """The 64-bit MMIO window in MiB, and a warning: ``requested`` (bytes, --mmio-window)
    when given, else sized from the devices' BARs.

    The window is a power of two of at least 32 GiB, like the sized one; a request
    smaller than the known BARs is refused (the GPUs would fail inside the guest), and
    devices whose BARs are unknown need a request."""
    needed = mmio_window_mb(devices)
    if requested is None:
        if needed is None:
            from ..host.nvidia import model_name

            unknown = [d for d in devices if d.bar_sizes is None]
            named = ", ".join(f"{d.address} ({model_name(d)})" for d in unknown)
            raise InputError(
                f"the BAR sizes of {named} are unknown (libvirt does not report BARs and "
                "tdxvirt's table of known GPUs lacks the device), so the TD's 64-bit MMIO window "
                "cannot be sized; pass --mmio-window SIZE, at least the sum of the devices' BARs "
                "(`lspci -vv` on that host shows them), e.g. 256G for one H100")
        return needed, None
    asked_mb = -(-requested // MIB)
    window = window_mb_for(asked_mb)
    if needed is not None and window < needed:
        raise InputError(f"--mmio-window {human(requested)} is smaller than the "
                         f"{human(needed * MIB)} the devices' BARs need; drop --mmio-window "
                         f"or give at least {human(needed * MIB)}")
    if window != asked_mb or requested % MIB:
        return window, (f"--mmio-window {human(requested)} rounded up to {human(window * MIB)} "
                        "(a power of two, at least OVMF's own 32G)")
    return window, None


QCOW2_MAGIC = b"QFI\xfb"


def _qemu_img_info(path: str, fmt: str, option: str, chain: bool) -> dict | list:
    """``qemu-img info --output=json -f FMT [--backing-chain] PATH``, parsed.

    The format is always given: qemu-img never probes the user's file (a guest that
    wrote a qcow2 header into its raw disk must not make it a qcow2 with a backing file)."""
    import subprocess

    argv = ["qemu-img", "info", "--output=json", "-f", fmt, *(["--backing-chain"] if chain else []),
            path]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60,
                                stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise HostNotReadyError("qemu-img is not installed (Debian: qemu-utils); tdxvirt reads "
                                "disk images with it") from None
    except subprocess.TimeoutExpired:
        raise InputError(f"{option} {path}: qemu-img info did not finish within 60 s; is it a "
                         "regular file on a responsive file system?") from None
    if result.returncode != 0:
        why = " ".join(result.stderr.split())[:300] or f"exit {result.returncode}"
        if "lock" in why:  # in use by a running QEMU: the format is not the problem
            raise InputError(f"{option} {path}: qemu-img cannot read it ({why}); stop what "
                             "uses it first")
        other = "raw" if fmt == "qcow2" else "qcow2"
        raise InputError(f"{option} {path}: qemu-img cannot read it as {fmt} ({why}); if it is "
                         f"a {other} image, say so with {format_option(option)} {other}")
    try:
        return json.loads(result.stdout)
    except ValueError:
        raise InputError(f"{option} {path}: qemu-img info gave no readable JSON") from None


def format_option(option: str) -> str:
    """--disk -> --disk-format, --image -> --image-format."""
    return f"{option}-format"


def inspect_image(path: str, fmt: str, option: str, allow_backing_file: bool = False) -> list[str]:
    """Check a user-given --disk or --image file as the format the user declared
    (default raw, as libvirt assumes; never a guess from its content); the warnings.

    A file with a backing file is refused unless ``allow_backing_file``: its chain
    would hand QEMU (and the TD) files the user never named. With the opt-in, every
    link of the chain must name its own format, or QEMU would probe it."""
    info = _qemu_img_info(path, fmt, option, chain=False)
    backing = info.get("backing-filename") if isinstance(info, dict) else None
    if backing is not None:
        if not allow_backing_file:
            raise InputError(
                f"{option} {path}: the {fmt} image has a backing file ({backing!r}), which the "
                "TD would read too; refusing: flatten it (`qemu-img convert`), or pass "
                "--allow-backing-file if you trust its whole chain")
        chain = _qemu_img_info(path, fmt, option, chain=True)
        for link in chain if isinstance(chain, list) else [chain]:
            if link.get("backing-filename") is not None and not link.get("backing-filename-format"):
                raise InputError(
                    f"{option} {path}: {link.get('filename')!r} in its backing chain does not "
                    "name the format of its backing file, which QEMU would then guess; fix it "
                    "with `qemu-img rebase -u -F FORMAT -b BACKING FILE`")
    warnings = []
    if fmt == "raw":
        try:
            with open(path, "rb") as image:
                looks_qcow2 = image.read(4) == QCOW2_MAGIC
        except OSError:
            looks_qcow2 = False
        if looks_qcow2:
            warnings.append(
                f"{option} {path} starts with a qcow2 header but is used as raw (the default; "
                f"the format is never guessed); if it is a qcow2 image, pass "
                f"{format_option(option)} qcow2")
    return warnings


def numa_nodeset(gpus: list[PciDevice]) -> tuple[str | None, str | None]:
    """The GPUs' NUMA nodes as a libvirt nodeset, and a warning when none is known."""
    nodes = sorted({g.numa_node for g in gpus if g.numa_node is not None})
    if not nodes:
        return None, "--numa auto: the GPUs' NUMA node is unknown (sysfs numa_node -1); no NUMA placement"
    return nodeset_text(nodes), None


def nodeset_text(nodes: list[int]) -> str:
    """libvirt's own bitmap format ("0-2,4"), so its read-back is identical."""
    runs: list[list[int]] = []
    for node in sorted(set(nodes)):
        if runs and node == runs[-1][1] + 1:
            runs[-1][1] = node
        else:
            runs.append([node, node])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def mmio_args(mmio_mb: int) -> tuple[str, ...]:
    return ("-fw_cfg", f"name={MMIO_FWCFG},string={mmio_mb}")


def qemu_tdx_args(spec: TDSpec) -> tuple[str, ...]:
    """The qemu-args dialect: what libvirt cannot say for a TD without TDX XML.

    libvirt itself already emits the firmware (``<loader type='rom'>`` is ``-bios``) and
    the split irqchip (``<ioapic driver='qemu'/>`` is ``kernel_irqchip=split``), so only
    the tdx-guest object and the machine property naming it are added. The second
    ``-machine`` names no machine type: QEMU merges every ``-machine`` option into one,
    so libvirt's machine type and properties stay as libvirt chose them."""
    tdx_object = {"qom-type": "tdx-guest", "id": "tdx", "attributes": spec.policy}
    for key, value in (("mrconfigid", spec.mr_config_id), ("mrowner", spec.mr_owner),
                       ("mrownerconfig", spec.mr_owner_config)):
        if value:
            tdx_object[key] = value
    if spec.qgs:
        tdx_object["quote-generation-socket"] = (
            {"type": "vsock", "cid": str(spec.qgs.cid), "port": str(spec.qgs.port)}
            if spec.qgs.is_vsock else {"type": "unix", "path": spec.qgs.path})
    return (
        "-object", json.dumps(tdx_object, separators=(",", ":")),  # JSON: no option-string quoting
        "-machine", "confidential-guest-support=tdx",
    )


def _check_quote_service(spec: TDSpec, dialect: str) -> None:
    if spec.qgs and spec.qgs.is_vsock and dialect == "native":
        raise InputError(
            "--qgs vsock:CID:PORT: upstream libvirt only takes a unix socket path for the "
            "quote service; give --qgs /path/to/qgs.socket, or --dialect canonical/qemu-args"
        )


def overlay_path(spec: TDSpec, overlay_dir: str) -> str:
    return os.path.join(overlay_dir, f"{spec.name}.qcow2")


def seed_path(spec: TDSpec, overlay_dir: str | None) -> str | None:
    if not spec.cloud_init:
        return None
    if overlay_dir is None:
        raise InputError("--cloud-init needs a directory for the seed; set defaults.overlay_dir")
    return os.path.join(overlay_dir, f"{spec.name}-seed.iso")


def plan_disk(spec: TDSpec, overlay_dir: str | None) -> Disk | None:
    """The boot disk: --disk as is, or a new qcow2 overlay on --image. Both in the format
    the user declared (spec.disk_format, default raw): never guessed from the content
    (tdxvirt.lifecycle.assemble has the file checked with inspect_image before)."""
    if spec.disk:
        return Disk(spec.disk, spec.disk_format)
    if spec.image:
        if overlay_dir is None:
            raise InputError("--image needs an overlay directory; set defaults.overlay_dir")
        return Disk(overlay_path(spec, overlay_dir), "qcow2", spec.image, spec.disk_format)
    return None


def plan_domain(
    spec: TDSpec,
    *,
    gpus: list[PciDevice],
    switches: list[PciDevice] = (),
    dialect: str,
    libvirt_version: int,
    loader: str | None,
    emulator: str | None = None,
    overlay_dir: str | None = None,
) -> DomainPlan:
    """Decide everything; ``dialect`` is 'plain' for --no-tdx."""
    _check_quote_service(spec, dialect)
    memory, memory_warning = align_memory(spec.memory)
    warnings = [memory_warning]
    if spec.policy & 1:
        warnings.append("TDX debug policy bit set: the host can read this TD's memory; "
                        "never use it in production")
    nodeset = None
    if spec.numa_auto:
        nodeset, numa_warning = numa_nodeset(gpus)
        warnings.append(numa_warning)
    devices = [*gpus, *switches]
    mmio_mb, mmio_warning = plan_mmio(devices, spec.mmio_window)
    warnings.append(mmio_warning)
    if mmio_mb >= LARGE_MMIO_MB:
        warnings.append(f"the 64-bit MMIO window is {human(mmio_mb * MIB)}: a window of 8 TiB or "
                        "more was reported to break the iommufd bind of Blackwell GPUs; if the "
                        "start fails there, fewer GPUs per TD keep the window at 4 TiB or less")
    hostdevs = tuple(
        # Root port index i (1-based; 0 is pcie-root) carries device i.
        Hostdev(d.address, index, "nvswitch" if d in switches else "gpu")
        for index, d in enumerate(devices, start=1)
    )
    qgs = spec.qgs if dialect != "plain" else None
    return DomainPlan(
        name=spec.name,
        dialect=dialect,
        virt_type=spec.virt_type,
        vcpus=spec.vcpus,
        memory_kib=memory // 1024,
        loader=loader,
        emulator=emulator,
        mmio_mb=mmio_mb,
        policy_hex=f"{spec.policy:#x}",
        mr_config_id=spec.mr_config_id,
        mr_owner=spec.mr_owner,
        mr_owner_config=spec.mr_owner_config,
        qgs_path=qgs.path if qgs and not qgs.is_vsock else None,
        qgs_vsock=(qgs.cid, qgs.port) if qgs and qgs.is_vsock else None,
        hostdevs=hostdevs,
        managed=spec.managed,
        iommufd=libvirt_version >= LIBVIRT_HOSTDEV_IOMMUFD and dialect in ("native", "plain"),
        # TDX needs the split irqchip; a plain TCG guest cannot have it.
        split_irqchip=dialect != "plain" or spec.virt_type == "kvm",
        disk=plan_disk(spec, overlay_dir),
        seed=seed_path(spec, overlay_dir),
        kernel=spec.kernel,
        initrd=spec.initrd,
        cmdline=spec.cmdline,
        network=spec.network,
        ssh_port=spec.ssh_port,
        vsock=spec.vsock,
        hugepage_kib=HUGEPAGES[spec.hugepages] if spec.hugepages else None,
        numa_nodeset=nodeset,
        qemu_args=(qemu_tdx_args(spec) if dialect == "qemu-args" else ()) + mmio_args(mmio_mb)
        + spec.qemu_args,
        warnings=tuple(w for w in warnings if w),
        os_id=spec.os_id or DEFAULT_OS,
    )
