"""``tdxvirt host setup``: the host facts it needs, and the plans for setup and revert.

``gather_facts`` reads the host (through the host root, plus ``grubby --info`` through
the runner); ``plan_setup`` and ``plan_revert`` are pure functions of those facts;
``apply.apply_plan`` carries a plan out.

The files setup may write are read the way they are written (``files.HostFiles``:
never through a symlinked directory), so a tree that would redirect a write is
refused before anything is planned, ``--dry-run`` included. Below a host root other
than ``/`` a dry run runs nothing (a ``RefusingRunner``): what ``grubby --info``
would have said is reported as skipped.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass

from ..enforce import script as hook
from ..errors import HostNotReadyError, InputError
from ..host import trust
from ..host.commands import NOT_RUN, CommandRunner, RefusingRunner, SubprocessRunner, refuses
from ..host.osrelease import OsRelease, read_os_release
from ..host.procs import loaded_modules
from ..host.root import HostRoot
from ..virt.dialect import KVM_INTEL_TDX
from . import apply, daemon, fabricmanager, files, kernelargs, modprobe, qemuconf, udev
from .plan import HostPlan, Notice, RunCommand, Step, WriteFile

QEMU_CONF = qemuconf.PATH
GRUB = kernelargs.GRUB_DEFAULTS
FILES = (modprobe.FILE, GRUB, QEMU_CONF, udev.FILE, hook.HOOK, fabricmanager.PATH)
DIRS = ("/etc/modprobe.d", "/etc/udev/rules.d", "/etc/libvirt")
_TOOL_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
SECURITY_DRIVERS = ("none", "keep")

SVIRT_WARNING = (
    'security_driver = "none" turns off sVirt (SELinux/AppArmor) confinement of every '
    "QEMU process libvirt starts on this host, as Intel's device-passthrough setup does; "
    "`--security-driver keep` keeps confinement and installs udev rules instead"
)


@dataclass(frozen=True)
class SetupOptions:
    user: str | None = None
    group: str | None = None
    security_driver: str = "none"  # none | keep
    legacy_vfio: bool = False

    def __post_init__(self):
        if self.security_driver not in SECURITY_DRIVERS:
            raise InputError(f"--security-driver must be none or keep, not "
                             f"{self.security_driver!r}")


@dataclass(frozen=True)
class HostFacts:
    os: OsRelease
    files: dict[str, bytes | None]  # current bytes of every file setup may write
    dirs: frozenset[str]  # which of DIRS exist
    grubby: bool
    grub_regen: tuple[str, ...] | None  # update-grub or grub-mkconfig argv
    grubby_kernels: tuple[tuple[str, ...], ...] | None  # args of each kernel
    grubby_error: str | None
    tdx_options: tuple[modprobe.ModuleOption, ...]
    dma_options: tuple[modprobe.ModuleOption, ...]
    kvm_intel_tdx: str | None  # /sys/module/kvm_intel/parameters/tdx
    daemon: daemon.DaemonInUse
    users: frozenset[str] | None  # None: /etc/passwd not readable
    groups: frozenset[str] | None
    grubby_skipped: bool = False  # grubby not run: below a host root other than /
    gpu_blacklist: tuple[str, ...] = ()  # GPU-grabbing drivers to blacklist (NVIDIA GPUs here)
    loaded_modules: frozenset[str] = frozenset()
    hook_install: dict | None = None  # HostRoot.hook_install
    nvlink_board: bool = False  # Blackwell GPUs whose NVLink the host manages (host.fabric)


def _tool(root: HostRoot, name: str) -> bool:
    return any(root.exists(f"{d}/{name}") for d in _TOOL_DIRS)


def _names(root: HostRoot, path: str) -> frozenset[str] | None:
    try:
        text = root.read_text(path)
    except OSError:
        return None
    return frozenset(line.split(":", 1)[0] for line in text.splitlines() if ":" in line)


def _gpu_blacklist(root: HostRoot) -> tuple[str, ...]:
    """The GPU-grabbing drivers no modprobe.d file blacklists yet, on a host with NVIDIA GPUs."""
    from ..host.nvidia import nvidia_devices

    if not nvidia_devices(root):
        return ()
    done = modprobe.blacklisted(root)
    return tuple(m for m in modprobe.GPU_BLACKLIST if m not in done)


def _nvlink_board(root: HostRoot) -> bool:
    from ..host.fabric import nvlink_board
    from ..host.nvidia import nvidia_devices

    return nvlink_board(root, nvidia_devices(root)) is not None


def _grub_regen(root: HostRoot) -> tuple[str, ...] | None:
    if _tool(root, "update-grub"):
        return ("update-grub",)
    if _tool(root, "grub2-mkconfig"):
        return ("grub2-mkconfig", "-o", "/boot/grub2/grub.cfg")
    if _tool(root, "grub-mkconfig"):
        return ("grub-mkconfig", "-o", "/boot/grub/grub.cfg")
    return None


def gather_facts(root: HostRoot, runner: CommandRunner) -> HostFacts:
    grubby = _tool(root, "grubby")
    kernels, grubby_error = None, None
    skipped = grubby and refuses(runner)
    host = files.HostFiles(root)
    if skipped:
        grubby_error = f"`grubby --info=ALL` {NOT_RUN}"
    elif grubby:
        check = getattr(runner, "check", None)
        if check is not None:
            check(("grubby", "--info=ALL"))  # refused: one line, before anything is planned
        result = runner.run(("grubby", "--info=ALL"))
        if result.ok:
            kernels = tuple(tuple(k) for k in kernelargs.parse_grubby_info(result.stdout))
        else:
            grubby_error = f"`grubby --info=ALL` failed: {result.tail() or 'no output'}"
    return HostFacts(
        os=read_os_release(root),
        files={path: host.read_bytes(path) for path in FILES},
        dirs=frozenset(d for d in DIRS if host.is_dir(d)),
        grubby=grubby,
        grub_regen=_grub_regen(root),
        grubby_kernels=kernels,
        grubby_error=grubby_error,
        tdx_options=tuple(modprobe.configured_options(root, "kvm_intel", "tdx")),
        dma_options=tuple(modprobe.configured_options(root, "vfio_iommu_type1",
                                                      "dma_entry_limit")),
        kvm_intel_tdx=root.read_value(KVM_INTEL_TDX),
        daemon=daemon.detect(root),
        users=_names(root, "/etc/passwd"),
        groups=_names(root, "/etc/group"),
        grubby_skipped=skipped,
        gpu_blacklist=_gpu_blacklist(root),
        loaded_modules=loaded_modules(root) or frozenset(),
        hook_install=root.hook_install,
        nvlink_board=_nvlink_board(root),
    )


def require_local(uri: str) -> None:
    """Setup changes the machine it runs on: a URI naming another host is refused
    (`host setup`, the Ansible module tdx_host)."""
    from ..doctor.context import is_remote

    if is_remote(uri):
        raise InputError(f"host setup changes the machine it runs on, and {uri} names "
                         "another host; run tdxvirt host setup on that host")


def check_privileges(dry_run: bool, euid: int | None = None) -> None:
    if dry_run:
        return
    if (os.geteuid() if euid is None else euid) != 0:
        raise HostNotReadyError(
            "tdxvirt host setup changes files in /etc and restarts libvirt: run it as "
            "root (sudo); `--dry-run` shows what it would do without root")


def runner_for(root: HostRoot, dry_run: bool, run_below_root: bool) -> CommandRunner:
    """What setup may run: this machine's programs for host root /; below any other
    root nothing on a dry run, and the tree's own programs only when asked for
    (``--run-below-root``) and only a tree that root alone can change."""
    if trust.is_real_root(root.base):
        return SubprocessRunner()
    if (own := root.runner()) is not None:  # a whole host that says how its programs run
        return RefusingRunner(root) if dry_run else own
    if dry_run:
        return RefusingRunner(root)
    if not run_below_root:
        raise InputError(
            f"host setup below host root {root.base} would run that tree's own programs "
            "(grubby, update-grub, systemctl, udevadm) as root, and a chroot does not "
            "contain root: pass --run-below-root if it is a system tree you trust, or see "
            "what setup would do with --dry-run")
    trust.require_trusted(root.base, "host root", error=HostNotReadyError,
                          otherwise="see what setup would do with --dry-run")
    return SubprocessRunner(root)


# --- planning (pure) --------------------------------------------------------------

def _others(options: tuple[modprobe.ModuleOption, ...]) -> list[modprobe.ModuleOption]:
    return [o for o in options if o.file != modprobe.FILE]


def _plan_modprobe(facts: HostFacts, options: SetupOptions, out: list[Step]) -> bool:
    """Returns whether kvm_intel must be reloaded (reboot) for the change to count."""
    if "/etc/modprobe.d" not in facts.dirs:
        out.append(Notice(f"cannot write {modprobe.FILE} on {facts.os.pretty_name}: there "
                          "is no /etc/modprobe.d (kmod not installed?); load kvm_intel "
                          "with tdx=on some other way", "cannot"))
        return False
    others = _others(facts.tdx_options)
    tdx_elsewhere = bool(others) and others[-1].value in modprobe.TRUE_VALUES
    dma_others = _others(facts.dma_options)
    dma_elsewhere = bool(dma_others) and _int(dma_others[-1].value) >= modprobe.DMA_ENTRY_LIMIT
    need_dma = options.legacy_vfio and not dma_elsewhere
    # blacklisted by tdxvirt's own file already: still wanted there (the file is rewritten whole)
    current = facts.files[modprobe.FILE]
    in_ours = modprobe.parse_blacklist(current.decode(errors="replace")) if current else set()
    ours_blacklist = tuple(m for m in modprobe.GPU_BLACKLIST if m in facts.gpu_blacklist or m in in_ours)
    # Another file already does it: tdxvirt's file is not needed (left as it is).
    if tdx_elsewhere and not need_dma and not ours_blacklist:
        wanted = current
    else:
        wanted = modprobe.render(need_dma, ours_blacklist, tdx=not tdx_elsewhere).encode()
    if wanted != current:
        purposes = ([] if tdx_elsewhere else ["load kvm_intel with tdx=on"]) \
            + (["raise VFIO's DMA entry limit"] if need_dma else []) \
            + ([f"keep {' and '.join(ours_blacklist)} off the GPUs"] if ours_blacklist else [])
        out.append(WriteFile(modprobe.FILE, current, wanted, "; ".join(purposes)))
    ours = modprobe.FILE.rsplit("/", 1)[1]
    for option in others:
        if option.file.rsplit("/", 1)[1] > ours and option.value not in modprobe.TRUE_VALUES:
            out.append(Notice(f"{option.file} sets kvm_intel tdx={option.value} and is read "
                              f"after {modprobe.FILE}, so it wins: remove that option",
                              "warning"))
    changed = any(isinstance(s, WriteFile) and s.path == modprobe.FILE for s in out)
    loaded = [m for m in ours_blacklist if m in facts.loaded_modules]
    if changed and loaded:
        out.append(Notice(f"{' and '.join(loaded)} {'is' if len(loaded) == 1 else 'are'} loaded now: "
                          "the blacklist counts from the next boot (or `modprobe -r` once no GPU "
                          "uses it)", "warning"))
    return changed and (facts.kvm_intel_tdx != "Y" or bool(loaded))


def _plan_fabric_manager(facts: HostFacts, out: list[Step], notices: list[Step]) -> None:
    """On an HGX B200/B300 board: Fabric Manager's rail policy as multi-GPU passthrough
    needs it. Restarting Fabric Manager is left to the admin: it re-partitions the
    NVLink fabric under every GPU, and the GPUs need a reset after it (the CC switch's)."""
    if not facts.nvlink_board:
        return
    path = fabricmanager.PATH
    current = facts.files[path]
    if current is None:
        notices.append(Notice(f"cannot set Fabric Manager's {fabricmanager.RAIL_POLICY}: {path} "
                              "does not exist; install nvidia-fabricmanager (the driver's "
                              "version) and nvlsm, then run setup again", "cannot"))
        return
    text = current.decode("utf-8", "surrogateescape")
    if fabricmanager.rail_policy(text) == fabricmanager.WANTED:
        return
    new = fabricmanager.set_rail_policy(text).encode("utf-8", "surrogateescape")
    out.append(WriteFile(path, current, new,
                         f"{fabricmanager.RAIL_POLICY}=symmetric: Fabric Manager 595+ leaves "
                         "CC off on multi-GPU passthrough otherwise"))
    notices.append(Notice("restart nvidia-fabricmanager once no TD uses the GPUs (it reads its "
                          "settings when it starts), then set CC mode again (`tdxvirt gpu "
                          "cc-mode BDF... --set on`: its reset is the one NVLink 5 GPUs need "
                          "after Fabric Manager starts)", "warning"))


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        return 0


def _grub_has(text: bytes, wanted) -> bool:
    try:
        decoded = text.decode("utf-8", "surrogateescape")
        return kernelargs.edit_grub_defaults(decoded, wanted) == decoded
    except kernelargs.GrubDefaultsError:
        return False


def _plan_kernel_args(facts: HostFacts, out: list[Step], later: list[Step]) -> bool:
    """Returns whether the next boot's command line changes."""
    wanted = kernelargs.TDX_HOST_ARGS
    text = facts.files[GRUB]
    if text is not None and not facts.grubby and _grub_has(text, wanted):
        return False  # nothing to write, so nothing to regenerate either
    use_grub_file = text is not None and facts.grub_regen is not None and (
        not facts.grubby or facts.grub_regen == ("update-grub",))
    if use_grub_file:
        try:
            new = kernelargs.edit_grub_defaults(text.decode("utf-8", "surrogateescape"),
                                                wanted).encode("utf-8", "surrogateescape")
        except kernelargs.GrubDefaultsError as error:
            out.append(Notice(str(error), "cannot"))
            return False
        if new == text:
            return False
        out.append(WriteFile(GRUB, text, new,
                             f"add {' '.join(wanted)} to GRUB_CMDLINE_LINUX"))
        later.append(RunCommand(facts.grub_regen, "regenerate the boot loader's menu"))
        return True
    if facts.grubby:
        if facts.grubby_skipped:
            out.append(Notice(
                f"kernel arguments: {facts.grubby_error}; a real run adds whichever of "
                f"`{' '.join(wanted)}` a kernel lacks with "
                f"`{shlex.join(kernelargs.grubby_command(list(wanted)))}`", "warning"))
            return False
        if facts.grubby_kernels is None:
            out.append(Notice(f"cannot set kernel arguments: {facts.grubby_error}", "cannot"))
            return False
        kernels = [list(k) for k in facts.grubby_kernels]
        missing = [a for a in wanted
                   if any(a in kernelargs.missing_args(k, wanted) for k in kernels)]
        if not missing:
            return False
        # grubby --remove-args acts on every kernel: revert takes back only arguments
        # that no kernel had before, never one a kernel was already booting with.
        new_everywhere = [a for a in missing
                          if all(a in kernelargs.missing_args(k, wanted) for k in kernels)]
        later.append(RunCommand(
            kernelargs.grubby_command(missing), "add the kernel arguments to every kernel",
            undo=kernelargs.grubby_command(new_everywhere, remove=True)
            if new_everywhere else None))
        return True
    reason = ("/etc/default/grub exists but neither update-grub nor grub-mkconfig does"
              if text is not None else "no grubby and no /etc/default/grub")
    out.append(Notice(f"cannot set kernel arguments on {facts.os.pretty_name}: {reason}; "
                      f"add `{' '.join(wanted)}` to the boot loader's kernel command line "
                      "by hand", "cannot"))
    return False


def _commented_value(conf: qemuconf.QemuConf, key: str) -> str | None:
    default = conf.commented_default(key)
    if default is None:
        return None
    try:
        value = qemuconf.QemuConf.parse(default.text.lstrip("#").lstrip(), conf.source).get(key)
    except qemuconf.QemuConfSyntaxError:
        return None
    return value if isinstance(value, str) else None


def _identity(options: SetupOptions, conf: qemuconf.QemuConf | None,
              facts: HostFacts) -> tuple[str, str]:
    """The user and group QEMU runs as: given, else configured, else the distro's default."""
    def pick(given, key, known, fallbacks, what, flag):
        value = given
        if value is None and conf is not None:
            active = conf.get(key)
            value = active if isinstance(active, str) else _commented_value(conf, key)
        if value is None and known is not None:
            value = next((name for name in fallbacks if name in known), None)
        if value is None:
            raise InputError(f"cannot tell which {what} QEMU should run as; pass {flag} NAME")
        numeric = value.lstrip("+").isdigit()
        if known is not None and not numeric and value not in known:
            source = "/etc/passwd" if what == "user" else "/etc/group"
            raise InputError(f"no {what} {value!r} on this host ({source}); pass {flag} "
                             f"with an existing {what}, or create it first")
        return value

    user = pick(options.user, "user", facts.users, ("libvirt-qemu", "qemu"), "user", "--user")
    group = pick(options.group, "group", facts.groups, ("libvirt-qemu", "kvm", "qemu"),
                 "group", "--group")
    return user, group


def plan_setup(facts: HostFacts, options: SetupOptions) -> HostPlan:
    steps: list[Step] = []
    commands: list[Step] = []
    notices: list[Step] = []
    reload_module = _plan_modprobe(facts, options, steps)
    new_cmdline = _plan_kernel_args(facts, steps, commands)
    _plan_fabric_manager(facts, steps, notices)

    current = facts.files[QEMU_CONF]
    restart_for: list[str] = []  # why libvirt must restart (once, whatever the reasons)
    conf = qemuconf.QemuConf.parse(current) if current is not None else None
    try:
        user, group = _identity(options, conf, facts)
    except InputError:
        if conf is not None or options.security_driver == "keep":
            raise
        user = group = ""  # nothing below needs them: qemu.conf is missing
    if conf is None:
        notices.append(Notice(
            f"cannot edit {QEMU_CONF}: it does not exist (libvirt's QEMU driver is not "
            f"installed on {facts.os.pretty_name}?); install it (Debian: "
            "libvirt-daemon-system) and run setup again", "cannot"))
    else:
        settings: dict[str, qemuconf.Value] = {"user": user, "group": group,
                                               "dynamic_ownership": 0}
        if options.security_driver == "none":
            settings["security_driver"] = "none"
            notices.append(Notice(SVIRT_WARNING, "warning"))
        elif conf.get("security_driver") == "none":
            notices.append(Notice(f'{QEMU_CONF} already has security_driver = "none" '
                                  "(sVirt off); --security-driver keep leaves it as it is "
                                  "(`tdxvirt host setup --revert` restores the original)",
                                  "warning"))
        new = qemuconf.set_values(conf, settings).encode()
        if new != current:
            steps.append(WriteFile(QEMU_CONF, current, new,
                                   f"run QEMU as {user}:{group} with "
                                   + ", ".join(f"{k} = {qemuconf.format_value(k, v)}"
                                               for k, v in settings.items()
                                               if k not in ("user", "group"))))
            restart_for.append("reread qemu.conf")

    wanted_hook = hook_script(facts.hook_install)
    # no /etc/libvirt: libvirt is not installed, which the qemu.conf step already says
    if "/etc/libvirt" in facts.dirs and facts.files[hook.HOOK] != wanted_hook:
        steps.append(WriteFile(hook.HOOK, facts.files[hook.HOOK], wanted_hook,
                               "refuse, inside libvirt, to start a TD that is no longer what root "
                               "recorded, whichever tool starts it (libvirt's qemu hook)",
                               mode=hook.HOOK_MODE, dir_mode=hook.HOOK_DIR_MODE))
        restart_for.append("find its hooks (it looks when it starts)")
    if restart_for:
        argv = daemon.restart_argv(facts.daemon)
        if argv:
            commands.append(RunCommand(argv, "make libvirt " + " and ".join(restart_for)))
        else:
            notices.append(Notice(daemon.restart_advice(facts.daemon),
                                  "warning" if facts.daemon.running else "info"))

    if options.security_driver == "keep":
        if "/etc/udev/rules.d" not in facts.dirs:
            notices.append(Notice(f"cannot install {udev.FILE}: there is no "
                                  "/etc/udev/rules.d (udev not installed?); give group "
                                  f"{group} access to /dev/vfio/*, /dev/iommu and "
                                  "/dev/vfio/devices/* some other way", "cannot"))
        else:
            rules = udev.render(group).encode()
            if facts.files[udev.FILE] != rules:
                steps.append(WriteFile(udev.FILE, facts.files[udev.FILE], rules,
                                       f"let group {group} open the VFIO and iommufd devices"))
                commands.append(RunCommand(udev.RELOAD, "make udev read the new rules"))
                commands += [RunCommand(argv, "apply them to existing device nodes")
                             for argv in udev.TRIGGER]
    if new_cmdline or reload_module:
        why = "the kernel command line changed" if new_cmdline else \
            "kvm_intel reads tdx=on only when it loads"
        notices.append(Notice(why, "reboot"))
    return HostPlan(tuple(steps + commands + notices))


def plan_revert(manifest: dict, current: dict[str, bytes | None],
                originals: dict[str, bytes | None], facts: HostFacts) -> HostPlan:
    """Steps that put back every file setup changed, unless someone changed it since."""
    steps: list[Step] = []
    commands: list[Step] = []
    notices: list[Step] = []
    restored = set()
    for path, record in sorted(manifest["files"].items()):
        now, original = current.get(path), originals.get(path)
        if now == original:
            continue
        written = record.get("written_sha256")
        if written is not None and apply.sha256(now or b"") != written:
            notices.append(Notice(
                f"{path} changed since tdxvirt wrote it; left as it is (the original is "
                f"in {apply.backup_file(path, record)})", "warning"))
            continue
        steps.append(WriteFile(path, now, original,
                               "restore the original" if original is not None
                               else "remove the file tdxvirt created",
                               mode=record.get("mode", 0o644)))
        restored.add(path)
    for argv in manifest.get("undo", []):
        commands.append(RunCommand(tuple(argv), "take back what setup ran"))
    if GRUB in restored and facts.grub_regen:
        commands.append(RunCommand(facts.grub_regen, "regenerate the boot loader's menu"))
    if udev.FILE in restored:
        commands.append(RunCommand(udev.RELOAD, "make udev forget tdxvirt's rules"))
    if restored & {QEMU_CONF, hook.HOOK}:
        argv = daemon.restart_argv(facts.daemon)
        if argv:
            commands.append(RunCommand(argv, "make libvirt reread qemu.conf"))
        else:
            notices.append(Notice(daemon.restart_advice(facts.daemon), "info"))
    if restored & {GRUB, modprobe.FILE} or manifest.get("undo"):
        notices.append(Notice("the boot settings were restored", "reboot"))
    return HostPlan(tuple(steps + commands + notices))


def hook_script(install: dict | None = None) -> bytes:
    """The hook setup installs: tdxvirt's current Python and this machine's records, or
    as a whole host root says tdxvirt is installed there (HostRoot.hook_install)."""
    from ..domain.record import records_dir

    return hook.script(**install) if install else hook.script(str(records_dir()))


# --- running ----------------------------------------------------------------------

def setup(root: HostRoot, runner: CommandRunner, options: SetupOptions,
          echo: Callable[[Step], None], dry_run: bool = False) -> HostPlan:
    facts = gather_facts(root, runner)
    plan = plan_setup(facts, options)
    if not dry_run:
        apply.apply_plan(plan, root, runner, echo, store=apply.BackupStore(root))
    return plan


def revert(root: HostRoot, runner: CommandRunner, echo: Callable[[Step], None],
           dry_run: bool = False) -> HostPlan:
    store = apply.BackupStore(root)
    manifest = store.load()
    facts = gather_facts(root, runner)
    host = files.HostFiles(root)
    current = {p: host.read_bytes(p) for p in manifest["files"]}
    originals = {p: store.original(p, r) for p, r in manifest["files"].items()}
    plan = plan_revert(manifest, current, originals, facts)
    if not dry_run:
        apply.apply_plan(plan, root, runner, echo, store=store, reverting=True)
        # Files already back to their original need no step; forget them too.
        manifest = store.load()
        for path in list(manifest["files"]):
            if host.read_bytes(path) == originals.get(path):
                store.forget(manifest, path)
        manifest["undo"] = []
        store.clear_if_empty(manifest)
    return plan
