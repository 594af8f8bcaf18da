"""The emulated TDX host: a libvirt daemon whose real qemu driver believes in KVM + TDX.

libvirtd runs in a Debian root (chroot.py), in a mount and network namespace of its
own, made by ``unshare``. Inside that namespace only:

- ``/dev`` is a private tmpfs that also holds ``kvm``, ``iommu``, ``vfio/vfio``,
  ``vfio/<group>`` and a ``vfio/devices/vfioN`` per GPU: inert nodes with the numbers of
  ``/dev/null`` (never this machine's real devices), group ``kvm``, mode 0660, as
  libvirt wants them;
- ``/sys/bus/pci``, ``/sys/kernel/iommu_groups`` and ``/sys/module`` are the
  simulated host's device tree (hostroot.build_sim_host: the board's GPUs, by default
  the real H100's sysfs values, bound to vfio-pci, in IOMMU group 42, with its vfio
  cdev; ``kvm_intel`` ``tdx=Y``; `tdxvirt sim up --board` chooses, boards.py);
- ``/usr/bin/qemu-system-x86_64`` is qemu_wrapper.py, which runs the root's real QEMU
  under TCG and answers libvirt's KVM probes; so is every other QEMU installed in the
  root (``/usr/local/bin``, ``/opt/*/bin``: a QEMU `tdxvirt build` made), each running
  its own real binary;
- libvirtd alone loads kvm_tdx_shim.so, which answers the two ioctls a file cannot
  (``KVM_CAP_VM_TYPES`` with the TDX bit, ``IOMMU_OPTION``).

Nothing of this machine changes: the host's /dev, /sys, network and modules are not
touched; the namespace goes away with its last process.

This module is run as ``unshare --mount --net --propagation private -- python -m
tdxvirt.sim.tdxhost ROOT DEVICES`` by chroot.start_daemons; it sets the namespace up,
starts virtlogd and libvirtd in it, and exits.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from importlib import resources
from pathlib import Path

from ..errors import SimulatorError

SIM_LIB = "usr/local/lib/tdxvirt-sim"
QEMU = "usr/bin/qemu-system-x86_64"
SHIM = f"{SIM_LIB}/kvm_tdx_shim.so"
WRAPPER = f"{SIM_LIB}/qemu-wrapper"
REAL_QEMU = f"{SIM_LIB}/qemu-system-x86_64.real"
REAL_DIR = f"{SIM_LIB}/real"  # qemu_wrapper.REAL_DIR: other emulators' real binaries
# Where another QEMU is installed on the host (`tdxvirt build run qemu --install`'s
# prefix /usr/local, or a prefix of its own under /opt): wrapped like the distribution's.
OTHER_EMULATORS = ("usr/local/bin/qemu-system-x86_64", "opt/*/bin/qemu-system-x86_64")
RECORD_DIR = "var/log/tdxvirt-sim"  # qemu_wrapper.RECORD_DIR, written as QEMU's user
# Inert stand-ins: the numbers of /dev/null. libvirt stats, opens and passes them; the
# shim answers the two ioctls it makes; QEMU under TCG never uses them.
NULL_DEVICE = os.makedev(1, 3)
KVM_NODES = ("kvm", "iommu", "vfio/vfio")  # and a vfio/devices/vfioN per GPU (the device tree's)
# The tun driver's node: a NIC's tap is made in the namespace's own network, never
# this machine's (its number is the kernel's, include/linux/miscdevice.h TUN_MINOR).
TUN_DEVICE = ("net/tun", os.makedev(10, 200))
SYSFS_FROM_DEVICES = ("sys/bus/pci", "sys/kernel/iommu_groups", "sys/module",
                      # over this machine's own PCI devices: the daemon sees the simulated GPU
                      # where the kernel puts it (hostroot.PCI_ROOT_BUS), and none of ours
                      "sys/devices/pci0000:00")
# The boot settings of the simulated host (hostroot.CMDLINE is what it booted with).
GRUB_DEFAULTS = "etc/default/grub"


def _source(name: str) -> bytes:
    return resources.files("tdxvirt.sim").joinpath(name).read_bytes()


def install(root: Path) -> None:
    """Put the wrapper, the compiled shim and tdxvirt's libvirt hook into the root
    (idempotent, by content)."""
    lib = root / SIM_LIB
    lib.mkdir(parents=True, exist_ok=True)
    _install_hook(root)
    _install_boot_settings(root)
    wrapper = root / WRAPPER
    source = _source("qemu_wrapper.py")
    if not wrapper.exists() or wrapper.read_bytes() != source:
        wrapper.write_bytes(source)
    wrapper.chmod(0o755)
    (root / REAL_QEMU).touch()  # a mount point for the real binary
    records = root / RECORD_DIR
    records.mkdir(parents=True, exist_ok=True)
    os.chown(records, _id(root / "etc/passwd", "libvirt-qemu"), _id(root / "etc/group", "libvirt-qemu"))
    records.chmod(0o755)
    shim_source = _source("kvm_tdx_shim.c")
    stamp = lib / "kvm_tdx_shim.sha256"
    digest = hashlib.sha256(shim_source).hexdigest()
    if (root / SHIM).exists() and stamp.exists() and stamp.read_text() == digest:
        return
    c_file = lib / "kvm_tdx_shim.c"
    c_file.write_bytes(shim_source)
    result = subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(root / SHIM), str(c_file),
                             "-ldl"], capture_output=True, text=True)
    if result.returncode != 0:
        raise SimulatorError(f"compiling the emulated host's ioctl shim failed: {result.stderr.strip()}")
    stamp.write_text(digest)


# tdxvirt as the simulated host has it installed: its hook (tdxvirt.enforce.script) run
# by the root's own Python, this checkout's tdxvirt package and this machine's TD
# records bound read-only where the hook finds them (one host: the records tdxvirt
# writes are the ones the daemon's hook reads).
HOOK_CODE = "usr/lib/tdxvirt/python"
HOOK_RECORDS = "var/lib/tdxvirt/records"
# The GPU's modes as the stand-in for NVIDIA's tool keeps them (SimLayout.gpu_tool_env),
# bound where the hook's stand-in reads them; its runs are logged beside QEMU's.
HOOK_GPU_MODES = "var/lib/tdxvirt/sim-gpu-modes.json"
HOOK_GPU_ENV = {"TDXVIRT_GPU_TOOLS": f"/{HOOK_CODE}/tdxvirt/sim/standin_gpu_tools.py",
                "STANDIN_SYSFS": "/", "STANDIN_STATE": f"/{HOOK_GPU_MODES}",
                "STANDIN_RECORD": f"/{RECORD_DIR}/gpu-tool-runs.jsonl"}


def hook_install() -> dict:
    """tdxvirt's hook as the simulated host has it installed (enforce.script.script's
    arguments): what `host setup` writes and `host check` expects there."""
    return {"records": f"/{HOOK_RECORDS}", "interpreter": "/usr/bin/python3",
            "code": f"/{HOOK_CODE}", "environment": HOOK_GPU_ENV}


def _install_hook(root: Path) -> None:
    from ..domain.record import records_dir
    from ..enforce.script import HOOK, HOOK_MODE, script

    records_dir().mkdir(mode=0o700, parents=True, exist_ok=True)
    (root / HOOK_CODE / "tdxvirt").mkdir(parents=True, exist_ok=True)  # mount points
    (root / HOOK_RECORDS).mkdir(parents=True, exist_ok=True)
    (root / HOOK_GPU_MODES).touch()
    hook = root / HOOK.lstrip("/")
    hook.parent.mkdir(parents=True, exist_ok=True)
    content = script(**hook_install())
    if not hook.exists() or hook.read_bytes() != content:
        hook.write_bytes(content)
    hook.chmod(HOOK_MODE)


def _install_boot_settings(root: Path) -> None:
    """What a TDX host installed with Debian has: GRUB's defaults naming the command
    line it booted with (hostroot.CMDLINE) and kmod's /etc/modprobe.d. Written once:
    afterwards they are the simulated host's own files, which `host setup` edits."""
    from .hostroot import CMDLINE

    (root / "etc/modprobe.d").mkdir(parents=True, exist_ok=True)
    grub = root / GRUB_DEFAULTS
    if not grub.exists():
        booted = " ".join(a for a in CMDLINE.split()
                          if a != "ro" and not a.startswith(("BOOT_IMAGE=", "root=")))
        grub.parent.mkdir(parents=True, exist_ok=True)
        grub.write_text(f'GRUB_DEFAULT=0\nGRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX_DEFAULT=""\n'
                        f'GRUB_CMDLINE_LINUX="{booted}"\n')


def _bind_hook_sources(root: Path) -> None:
    from .. import __file__ as package_init
    from ..domain.record import records_dir
    from . import layout

    for source, target, mode in (
            (Path(package_init).parent, root / HOOK_CODE / "tdxvirt", "ro"),
            (records_dir(), root / HOOK_RECORDS, "ro"),
            # the stand-in writes its state back after every run (same file, same inode)
            (Path(layout().gpu_tool_env["STANDIN_STATE"]), root / HOOK_GPU_MODES, "rw")):
        _mount("--bind", "-o", mode, str(source), str(target))


def other_emulators(root: Path) -> list[str]:
    """The root's other QEMU binaries (OTHER_EMULATORS), relative to it."""
    found = []
    for pattern in OTHER_EMULATORS:
        found += sorted(str(p.relative_to(root)) for p in root.glob(pattern) if p.is_file())
    return found


def _real_of(relative: str) -> str:
    return f"{REAL_DIR}/{relative.replace('/', '_')}"


def _bind_other_emulators(root: Path) -> None:
    for relative in other_emulators(root):
        real = root / _real_of(relative)
        real.parent.mkdir(parents=True, exist_ok=True)
        real.touch()
        _mount("--bind", str(root / relative), str(real))
        _mount("--bind", str(root / WRAPPER), str(root / relative))


def emulators_are_wrapped(root: Path) -> bool:
    """Whether the running emulated host runs every QEMU the root has behind the wrapper:
    one installed after its namespaces were made would run as itself, asking for KVM this
    machine does not have. True when nothing runs. Seen through its virtlogd's root."""
    from .chroot import alive_pid

    pid = alive_pid(root / "run" / "virtlogd.pid")
    if pid is None:
        return True
    wrapper = _source("qemu_wrapper.py")
    for relative in other_emulators(root):
        try:
            with open(f"/proc/{pid}/root/{relative}", "rb") as seen:
                if seen.read(len(wrapper) + 1) != wrapper:
                    return False
        except OSError:
            return False
    return True


def hook_code_is_current(root: Path) -> bool:
    """Whether the running emulated host's hook imports this tdxvirt: its namespaces bind
    the package of the tdxvirt that started them, and a checkout deleted since (a clean
    clone re-made at the same path) leaves the hook importing nothing ("No module named
    tdxvirt.domain"). True when nothing runs. Seen through its virtlogd's root."""
    from .. import __file__ as package_init
    from .chroot import alive_pid

    pid = alive_pid(root / "run" / "virtlogd.pid")
    if pid is None:
        return True
    try:
        bound = os.stat(f"/proc/{pid}/root/{HOOK_CODE}/tdxvirt/__init__.py")
        ours = os.stat(package_init)
    except OSError:
        return False
    return (bound.st_dev, bound.st_ino) == (ours.st_dev, ours.st_ino)


def _bind_shared_dirs(root: Path) -> None:
    """The emulated TDX host (not the libvirt 11.x one, which stands for another host)
    sees this machine's image and key directories at their own paths (onehost.shared_dirs)."""
    from . import layout
    from .onehost import shared_dirs

    if root.resolve() != layout().chroot.resolve():
        return
    for directory in shared_dirs(create=True):
        target = root / directory.lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        _mount("--bind", directory, str(target))


def _mount(*argv: str) -> None:
    result = subprocess.run(["mount", *argv], capture_output=True, text=True)
    if result.returncode != 0:
        raise SimulatorError(f"mount {' '.join(argv)}: {result.stderr.strip()}")


def _id(table: Path, name: str) -> int:
    """A user's or group's number in the root's own passwd/group file."""
    for line in table.read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise SimulatorError(f"{table} has no entry '{name}'; reinstall the simulated host (scripts/setup)")


def _populate_dev(root: Path, devices: Path) -> None:
    from .chroot import populate_dev

    dev = root / "dev"
    _mount("-t", "tmpfs", "-o", "mode=755", "tmpfs", str(dev))
    populate_dev(dev)
    groups = sorted(p.name for p in (devices / "sys/kernel/iommu_groups").iterdir())
    cdevs = sorted(p.name for p in (devices / "dev/vfio/devices").iterdir())
    gid = _id(root / "etc/group", "kvm")
    for name in (*KVM_NODES, *(f"vfio/{group}" for group in groups),
                 *(f"vfio/devices/{cdev}" for cdev in cdevs)):
        node = dev / name
        node.parent.mkdir(parents=True, exist_ok=True)
        os.mknod(node, 0o660 | stat.S_IFCHR, NULL_DEVICE)
        os.chown(node, 0, gid)
        os.chmod(node, 0o660)
    name, number = TUN_DEVICE
    (dev / name).parent.mkdir(parents=True, exist_ok=True)
    os.mknod(dev / name, 0o666 | stat.S_IFCHR, number)
    os.chmod(dev / name, 0o666)


# The environment systemd gives libvirt's units on a real host, not the caller's: libvirt
# passes it to hooks and prints it in their errors (virt-manager cuts those at 512 chars).
DAEMON_ENV = ("env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "LANG=C.UTF-8")


def enter(root: Path, devices: Path) -> None:
    """Inside the new namespaces: lay out /dev, /sys and the emulator, start the daemons."""
    from .chroot import DAEMONS, run

    run(["ip", "link", "set", "lo", "up"], "bringing up the namespace's loopback")
    # /var/lock is /run/lock, and /run a fresh tmpfs: libvirt locks a console's pty there
    (root / "run/lock").mkdir(mode=0o1777, exist_ok=True)
    _populate_dev(root, devices)
    for relative in SYSFS_FROM_DEVICES:
        if (root / relative).is_dir():  # a machine without a PCI bus 0 keeps its own
            _mount("--bind", str(devices / relative), str(root / relative))
    _bind_hook_sources(root)
    _bind_shared_dirs(root)
    _mount("--bind", str(root / QEMU), str(root / REAL_QEMU))
    _mount("--bind", str(root / WRAPPER), str(root / QEMU))
    _bind_other_emulators(root)
    if _board_has_fabric_manager(devices):
        from . import fabric

        fabric.start(root)
    for daemon in DAEMONS:
        preload = [f"LD_PRELOAD=/{SHIM}"] if daemon == "libvirtd" else []
        run(["chroot", str(root), *DAEMON_ENV, *preload, daemon, "-d"], f"starting {daemon}")


def _board_has_fabric_manager(devices: Path) -> bool:
    """Whether the device tree's board (its marker, build_devices) runs Fabric Manager."""
    from .boards import BOARDS

    try:
        name = (devices / ".tdxvirt-sim-version").read_text().split()[1]
    except (OSError, IndexError):
        return False
    return name in BOARDS and BOARDS[name].fabric_manager


def rejoin_argv(pid: int, root: Path) -> list[str]:
    """libvirtd started again in the namespaces of the emulated host's surviving process
    (its virtlogd): the same /dev, device tree and network as before."""
    return ["nsenter", f"--target={pid}", "--mount", "--net", "--", "chroot", str(root),
            *DAEMON_ENV, f"LD_PRELOAD=/{SHIM}", "libvirtd", "-d"]


def unshare_argv(root: Path, devices: Path) -> list[str]:
    return ["unshare", "--mount", "--net", "--propagation", "private", "--",
            sys.executable, "-m", "tdxvirt.sim.tdxhost", str(root), str(devices)]


def build_devices(devices: Path, root: Path, board: str | None = None) -> None:
    """The emulated host's device tree: the simulated host's with ``board``'s devices
    (boards.py; one H100 at 38:00.0 by default), built anew when the board or the tree's
    version changed."""
    from .boards import DEFAULT_BOARD
    from .hostroot import SIM_HOST_VERSION, build_sim_host

    board = board or DEFAULT_BOARD
    marker = devices / ".tdxvirt-sim-version"
    if marker.is_file() and marker.read_text().strip() == f"{SIM_HOST_VERSION} {board}":
        return
    staging = devices.with_name(devices.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    build_sim_host(staging, root, board)
    shutil.rmtree(devices, ignore_errors=True)
    staging.rename(devices)


if __name__ == "__main__":
    try:
        enter(Path(sys.argv[1]), Path(sys.argv[2]))
    except SimulatorError as error:
        print(f"tdxvirt sim: {error}", file=sys.stderr)
        sys.exit(1)
