"""The ``tdxvirt`` command line: parse, call the library, print.

Only click is imported at start-up; libvirt, lxml, jinja2 and tabulate are imported
by the commands that need them, so ``tdxvirt --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager

import click

from ..errors import TdxvirtError


def one_line(text: str) -> str:
    """Messages may quote what the user typed; control characters are shown escaped,
    so an error stays one line whatever the input held."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


_OS_ERROR_REMEDIES = {
    "ENOSPC": "free space there", "EDQUOT": "free space there or raise the quota",
    "EROFS": "that file system is mounted read-only", "EMFILE": "raise the open-file limit "
    "(ulimit -n)", "ENFILE": "the system is out of open files; try again later",
    "EACCES": "run as root, or give that path's owner access", "EPERM": "run as root",
}


def _os_error_line(error: OSError) -> str:
    import errno

    name = errno.errorcode.get(error.errno or 0, "")
    where = f" ({error.filename})" if error.filename else ""
    remedy = _OS_ERROR_REMEDIES.get(name, "fix that and run it again")
    return f"{error.strerror or error}{where}; {remedy}"


def error_line(error: BaseException) -> tuple[str, int] | None:
    """The message (before remedies are targeted and control characters escaped) and
    exit code a failure ends with: tdxvirt's own errors; an OS error tdxvirt did not
    word itself (a full or read-only disk, a quota, no file descriptors left); a libvirt
    call the library did not wrap (the daemon vanished between two calls, say). None for
    anything else (a bug: its traceback is shown). The CLI and the Ansible modules
    (ansible_collections/tdxvirt/tdx) end with these same lines."""
    if isinstance(error, TdxvirtError):
        return str(error), error.exit_code
    if isinstance(error, OSError):
        return _os_error_line(error), 1
    if type(error).__module__ == "libvirt":
        from ..virt.conn import translate

        translated = translate(error, "libvirt")
        return str(translated), translated.exit_code
    return None


def _fail(message: str, code: int) -> None:
    from .remedies import targeted

    click.echo(f"tdxvirt: error: {one_line(targeted(message))}", err=True)
    sys.exit(code)


class TdxvirtGroup(click.Group):
    """Every failure is one line on stderr and an exit code; never a traceback.

    Command groups of other areas (host, gpu, guest, build) live in modules of their
    own and are imported only when named, so start-up pays for none of them.
    """

    LAZY = {"host": "tdxvirt.cli.host:host", "gpu": "tdxvirt.cli.gpu:gpu",
            "guest": "tdxvirt.cli.guest:guest", "build": "tdxvirt.cli.build:build",
            "measure": "tdxvirt.cli.measure:measure", "repair": "tdxvirt.cli.repair:repair",
            "adopt": "tdxvirt.cli.repair:adopt", "selftest": "tdxvirt.cli.selftest:selftest"}

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def get_command(self, ctx, name):
        if name in self.LAZY and name not in self.commands:
            import importlib

            module, attribute = self.LAZY[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)

    def main(self, args=None, prog_name=None, **extra):
        from .remedies import remember

        remember(False, (), None, False)  # this invocation's options, once parsed (main below)
        extra.pop("standalone_mode", None)
        try:
            result = super().main(args, prog_name or "tdxvirt", standalone_mode=False, **extra)
        except TdxvirtError as error:
            _fail(*error_line(error))
        except click.UsageError as error:
            if type(error).__name__ == "NoArgsIsHelpError" and error.ctx is not None:
                # `tdxvirt` or `tdxvirt gpu` alone: the help, as git and virsh print it
                click.echo(error.ctx.get_help())
                sys.exit(0)
            where = error.ctx.command_path if error.ctx else "tdxvirt"
            _fail(f"{error.format_message()} (see `{where} --help`)", error.exit_code)
        except click.ClickException as error:
            _fail(error.format_message(), error.exit_code)
        except (click.Abort, KeyboardInterrupt):
            _fail("interrupted", 130)
        except Exception as error:
            line = error_line(error)
            if line is None:
                raise
            _fail(*line)
        sys.exit(result if isinstance(result, int) else 0)


class Session:
    """Global options, and the connection and host root they select (opened lazily).

    ``uri`` is what `-c` gave: None, one URI, or several (a tuple); with ``fleet``
    (``--fleet``) the config file's [hosts] (tdxvirt.lifecycle.fleet.resolve)."""

    def __init__(self, uri: str | tuple[str, ...] | None, sim: bool, host_root: str | None,
                 fleet: bool = False, host_timeout: float | None = None):
        self.sim = sim
        self._host_timeout = host_timeout
        connects = (uri,) if isinstance(uri, str) else tuple(uri or ())
        self._connects = connects
        self._fleet = fleet
        self._hosts = None
        # One URI: today's behaviour exactly, no config file read for it.
        self._uri = connects[0] if len(connects) == 1 and "://" in connects[0] and not fleet \
            else None
        self._host_root = host_root
        self._conn = None
        self._connect_uri: str | None = None  # a fleet host's URI as opened (Host.connect_uri)
        self.label: str | None = None  # its name in a fleet's HOST column
        self._started = False  # the simulated host is already up (each_host started it)
        if sim and host_root is None:
            import os

            from ..sim import layout

            for key, value in layout().gpu_tool_env.items():
                os.environ.setdefault(key, value)  # an explicit tool or state wins

    @property
    def host_timeout(self) -> float:
        """Each host's deadline in a fleet (the fleet module is imported only by a fleet)."""
        if self._host_timeout:
            return self._host_timeout
        from ..lifecycle.fleet import DEFAULT_TIMEOUT

        return DEFAULT_TIMEOUT

    @property
    def hosts(self):
        """The hosts named (tdxvirt.lifecycle.fleet.Host), in order; one for a single -c URI, []
        when no -c was given."""
        if self._hosts is None:
            from ..lifecycle.fleet import Host, resolve

            if self._uri is not None:
                self._hosts = [Host(self._uri, self._uri)]
            else:
                from ..config import load_config

                self._hosts = resolve(self._connects, self._fleet, load_config)
        return self._hosts

    @property
    def several(self) -> bool:
        """A fleet was asked for (--fleet, or -c given more than once): list, gpu list
        and host check ask every host and answer in the fleet's shape (a HOST column,
        host and uri in JSON), even when the names come down to one host."""
        return self._fleet or len(self._connects) > 1

    @property
    def uri(self) -> str:
        from ..virt.conn import resolve_uri

        if self._uri is None and (self._connects or self._fleet):
            hosts = self.hosts
            if len(hosts) > 1:
                from ..errors import InputError

                raise InputError(
                    f"this command acts on one host, and {len(hosts)} were given "
                    f"({', '.join(h.label for h in hosts)}); pass one -c (list, gpu list and "
                    "host check ask several; define picks one with --gpu any or --gpus N)")
            self._uri = hosts[0].uri
        if self._uri is None and self.sim:
            from ..sim import layout

            return layout().uri
        return resolve_uri(self._uri)

    def each_host(self) -> list[Session]:
        """A session per host named, each to open a connection of its own."""
        if self.sim:  # the simulated host is started once, not by every thread
            from ..sim import control

            control.up()
        sessions = []
        for host in self.hosts:
            session = Session(host.uri, self.sim, self._host_root, host_timeout=self.host_timeout)
            session.label, session._started = host.label, True
            session._connect_uri = host.connect_uri  # ssh never prompts: hosts run at once
            sessions.append(session)
        return sessions

    @property
    def host(self):
        from ..host import HostRoot

        if self._host_root is None and self.sim:
            from ..sim import layout

            return layout().host()
        return HostRoot(self._host_root or "/")

    def facts(self, conn=None):
        """The facts of the host the URI's TDs run on (tdxvirt.facts): this machine's,
        read below the host root, or another host's, through its libvirt only."""
        from ..facts import facts_for

        return facts_for(conn if conn is not None else self.conn(), self.host, self.uri)

    def conn(self):
        if self._conn is None:
            if self.sim and not self._started:
                from ..sim import control

                control.up()
            from ..virt.conn import open_connection

            self._conn = open_connection(self._connect_uri or self.uri)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.close()
            except Exception:  # a connection already lost has nothing left to close
                pass


pass_session = click.make_pass_decorator(Session)


def _version(ctx, param, value):
    from .completion import print_version

    print_version(ctx, param, value)


def _one_disk(param, values: tuple[str, ...]) -> str | None:
    """--disk / --image name the one disk a TD boots from; given twice, the first would
    be dropped without a word (click keeps the last), so it is refused instead."""
    if len(values) > 1:
        raise click.BadParameter(
            f"given {len(values)} times; a TD is defined with one boot disk: add data disks "
            "after define (`virt-xml NAME --add-device --disk PATH`; libvirt's hook accepts them)",
            param=param)
    return values[0] if values else None


def _td_names(ctx, param, incomplete):
    from .completion import td_names

    return td_names(ctx, param, incomplete)


def _gpu_addresses(ctx, param, incomplete):
    from .completion import gpu_addresses

    return gpu_addresses(ctx, param, incomplete)


@click.group(cls=TdxvirtGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--connect", "uri", metavar="URI", is_eager=True,  # --version reads it
              multiple=True,
              help="libvirt URI (default: $LIBVIRT_DEFAULT_URI, else qemu:///system), or a "
                   "host name of the config file's [hosts]; repeat to ask several hosts "
                   "(list, gpu list, host check; define --gpu any picks one).")
@click.option("--fleet", is_flag=True,
              help="Every host of the config file's [hosts], in its order (instead of -c).")
@click.option("--host-timeout", type=click.FloatRange(min=0, min_open=True), metavar="S",
              envvar="TDXVIRT_HOST_TIMEOUT",
              help="With several hosts (or define --gpu any): seconds each host has to answer "
                   "before it is reported as not answering (default 30).")
@click.option("--sim", is_flag=True, envvar="TDXVIRT_SIM", is_eager=True,
              help="Use the simulated TDX host (libvirt's qemu driver on the emulated TDX host + fake host root).")
@click.option("--host-root", metavar="DIR", envvar="TDXVIRT_HOST_ROOT",
              type=click.Path(exists=True, file_okay=False),
              help="Read host facts (sysfs, /proc, firmware) below DIR instead of /; "
                   "programs below DIR are never run, except by `host setup --run-below-root`.")
# not eager, and declared last: its callback runs after -c, --sim and --host-root have
# their values, from the command line in any order or from TDXVIRT_SIM / TDXVIRT_HOST_ROOT
@click.option("--version", is_flag=True, expose_value=False,
              callback=lambda ctx, param, value: _version(ctx, param, value),
              help="Show tdxvirt's version and libvirt's (library, and the daemon at the URI).")
@click.pass_context
def main(ctx, uri, sim, host_root, fleet, host_timeout):
    """Intel TDX trust domains with NVIDIA GPUs, through libvirt."""
    from ..virt.conn import is_remote
    from . import remedies

    if sim:
        import os

        from ..gpu.privilege import require_root

        # the simulated host is root's: its daemon's read-write socket, its namespaces and
        # its files live under root's state directory, which another user's tdxvirt
        # would not even look in (it has a state directory of its own)
        require_root("--sim", "the simulated TDX host, its libvirt daemon and its files "
                     "are root's", euid=os.geteuid, dry_run_hint=False)
    connects = (uri,) if isinstance(uri, str) else tuple(uri or ())
    # a [hosts] name may name another host: its host-level remedies are left alone
    remote = any("://" not in c or is_remote(c) for c in connects)
    remedies.remember(sim, connects, host_root, remote, fleet)
    ctx.obj = Session(uri, sim, host_root, fleet, host_timeout)


@main.command()
@click.argument("name", required=False, shell_complete=_td_names)
@click.option("--gpu", "gpus", multiple=True, metavar="BDF", shell_complete=_gpu_addresses,
              help="GPU to pass through (38:00.0 or 0000:38:00.0); repeat for more. 'any': "
                   "tdxvirt picks a free one (and, with several hosts, the host).")
@click.option("--gpus", "gpu_count", type=click.IntRange(min=1), metavar="N",
              help="Pass through N free GPUs tdxvirt picks (and, with several hosts, the host).")
@click.option("--vcpus", type=int, default=4, show_default=True, help="Number of vCPUs.")
@click.option("--memory", default="16G", show_default=True,
              help="Memory: number with K, M, G or T (bare number: MiB); 2 MiB aligned.")
@click.option("--image", metavar="PATH", multiple=True, callback=lambda c, p, v: _one_disk(p, v),
              help="Base image: boot a new qcow2 overlay on it.")
@click.option("--image-format", type=click.Choice(["raw", "qcow2"]),
              help="Format of --image (default raw, as libvirt assumes; never guessed).")
@click.option("--disk", metavar="PATH", multiple=True, callback=lambda c, p, v: _one_disk(p, v),
              help="Boot disk image, used as is.")
@click.option("--disk-format", type=click.Choice(["raw", "qcow2"]),
              help="Format of --disk (default raw, as libvirt assumes; never guessed).")
@click.option("--allow-backing-file", is_flag=True,
              help="Accept a --disk / --image that has a backing file (refused by default).")
@click.option("--kernel", metavar="PATH", help="Direct kernel boot: the guest kernel.")
@click.option("--initrd", metavar="PATH", help="Direct kernel boot: the initrd.")
@click.option("--cmdline", metavar="ARGS", help="Direct kernel boot: kernel arguments "
              "(clearcpuid=mtrr is added).")
@click.option("--ovmf", metavar="PATH", help="TDX OVMF (default: config, else QEMU firmware descriptors).")
@click.option("--qemu", metavar="PATH", help="QEMU emulator (default: config, else libvirt's).")
@click.option("--dialect", type=click.Choice(["native", "canonical", "qemu-args"]),
              help="Force the TDX XML dialect (default: from the target libvirt).")
@click.option("--policy", metavar="HEX", help="TD policy (default 0x10000000; bits 0 and 28 only).")
@click.option("--debug", is_flag=True, help="Set the debug policy bit (never in production).")
@click.option("--mr-config-id", metavar="BASE64", help="MRCONFIGID: base64 of 48 bytes.")
@click.option("--mr-owner", metavar="BASE64", help="MROWNER: base64 of 48 bytes.")
@click.option("--mr-owner-config", metavar="BASE64", help="MROWNERCONFIG: base64 of 48 bytes.")
@click.option("--qgs", metavar="PATH|vsock:CID:PORT", help="Quote generation service.")
@click.option("--managed/--no-managed", default=True, show_default=True,
              help="Let libvirt bind the GPUs to vfio-pci at start.")
@click.option("--allow-shared", is_flag=True, help="Allow a GPU another defined domain uses.")
@click.option("--ppcie", is_flag=True,
              help="Protected PCIe: all GPUs (or those given) plus the board's NVSwitches.")
@click.option("--network", default="auto", metavar="NET",
              help="The TD's NIC, as virt-install spells it: default (libvirt's NAT network "
                   "'default'), network=NAME, bridge=BR, user (passt, forwarding --ssh-port to "
                   "the guest's ssh) or none. Without it: 'default' when the host's libvirt "
                   "has that network, else none (with a warning).")
@click.option("--ssh-port", type=int, default=10022, show_default=True,
              help="Host port forwarded to the guest's ssh with --network user.")
@click.option("--vsock", is_flag=True, help="Add a virtio vsock device.")
@click.option("--hugepages", type=click.Choice(["2M", "1G"]), help="Back memory with huge pages.")
@click.option("--numa", type=click.Choice(["auto"]), help="Place memory on the GPUs' NUMA node(s).")
@click.option("--mmio-window", metavar="SIZE",
              help="64-bit MMIO window for the GPUs' BARs, e.g. 256G (default: sized from the "
                   "BARs; needed for a remote host's GPU whose BAR sizes tdxvirt does not know).")
@click.option("--no-tdx", "no_tdx", is_flag=True, help="The same VM without TDX (plain mode).")
@click.option("--virt-type", type=click.Choice(["kvm", "qemu"]), default="kvm", show_default=True,
              help="Domain type; 'qemu' (TCG) only for plain VMs on hosts without KVM.")
@click.option("--cloud-init", is_flag=True,
              help="Attach a cloud-init seed preparing the guest for an H100 in CC mode.")
@click.option("--ssh-key", multiple=True, metavar="FILE",
              help="Public key for the guest user (implies --cloud-init); repeatable.")
@click.option("--user-data", metavar="FILE",
              help="Your own cloud-init user-data, replacing tdxvirt's (implies --cloud-init).")
@click.option("--imex-channel", is_flag=True,
              help="The first boot makes NVIDIA's driver create IMEX channel 0 (multi-GPU "
                   "jobs over NVLink; implies --cloud-init).")
@click.option("--qemu-arg", multiple=True, metavar="ARG",
              help="Your own QEMU argument for <qemu:commandline> (repeat per word, e.g. "
                   "--qemu-arg -msg --qemu-arg timestamp=on); recorded with the TD, so "
                   "`show`, `start` and libvirt's hook accept exactly these. Arguments that "
                   "change the machine, objects, CPU or firmware are refused.")
@click.option("--os-variant", metavar="ID",
              help="The guest OS as libosinfo names it (virt-install's --os-variant, e.g. "
                   "ubuntu22.04; `osinfo-query os` lists them): virt-manager shows it and "
                   "picks device defaults by it. Default: linux2022, a generic recent Linux.")
@click.option("--print-xml", is_flag=True, help="Print the domain XML; define nothing.")
@click.option("--dry-run", is_flag=True,
              help="Run every check, print the XML and the files define would create; change nothing.")
@pass_session
def define(session, name, print_xml, dry_run, no_tdx, gpu_count, **options):
    """Define a TD with GPUs passed through (NAME defaults to one from the GPU)."""
    count = _gpus_to_pick(options["gpus"], gpu_count, options["ppcie"], options["allow_shared"])
    if not count:
        _define(session, name, print_xml, dry_run, no_tdx, options)
        return
    # --gpu any / --gpus N: the host and GPUs are tdxvirt's pick, said before, and held
    # (fleet.claimed) from the choice until the TD is defined
    with _picked(session, count, not no_tdx, options["managed"], options["mmio_window"],
                 to_stderr=print_xml) as (chosen, gpus):
        _define(chosen, name, print_xml, dry_run, no_tdx, {**options, "gpus": tuple(gpus)})


def _file_on(host):
    """Whether a path is a file on a host living in a root of its own (the simulated
    host), saying so when it is only on this machine."""
    import os

    def is_file(path: str) -> bool:
        if host.path(path).is_file():
            return True
        if os.path.isfile(path):
            from ..errors import InputError

            shared = ", ".join(getattr(host, "shared", ())) or "none of its directories"
            raise InputError(f"{path} is on this machine but not on the simulated host, which "
                             f"shares {shared} with it; move or copy the file there")
        return False
    return is_file


def _define(session, name, print_xml, dry_run, no_tdx, options) -> None:
    from ..domain.spec import TDSpec
    from ..lifecycle import tds
    from ..virt.conn import is_remote

    # For a remote URI the files named are that host's: not looked for here; a whole
    # host in a root of its own (the simulated host) is looked at there.
    remote = is_remote(session.uri)
    host = None if remote else session.host
    is_file = _file_on(host) if host is not None and host.files_in_root else None
    spec = TDSpec.from_user(name=name, tdx=not no_tdx, remote=remote, is_file=is_file, **options)
    if print_xml or dry_run:
        td = tds.assemble_td(session.conn(), session.facts(), spec)
        _warn(td.plan.warnings)
        click.echo(td.xml, nl=False)
        if dry_run:
            for line in define_dry_run_lines(td.plan, session.uri):
                click.echo(line)
        return
    td = tds.define_td(session.conn(), session.facts(), spec)
    _warn(td.plan.warnings)
    _describe(td, session.uri)


def define_dry_run_lines(plan, uri: str) -> list[str]:
    """What `define --dry-run` says after the XML: the files it would create, and where
    it would define the TD (the Ansible module tdx_td shows the same in its diff)."""
    from ..textsafe import safe

    made = [(plan.disk.path, f"qcow2 overlay on {plan.disk.overlay_base}")] \
        if plan.disk and plan.disk.overlay_base else []
    made += [(plan.seed, "cloud-init seed ISO")] if plan.seed else []
    return [f"would create {safe(path)} ({safe(what)})" for path, what in made] + \
        [f"would define {plan.name!r} at {safe(uri)} (dry run: nothing was changed)"]


def _gpus_to_pick(gpus: tuple[str, ...], count: int | None, ppcie: bool,
                  allow_shared: bool) -> int:
    """How many GPUs define is to pick itself (0: the user named them)."""
    from ..errors import InputError

    anys = [g for g in gpus if g.strip().lower() == "any"]
    if not anys and not count:
        return 0
    if gpus and (count or len(gpus) > 1):
        raise InputError("--gpu any and --gpus N let tdxvirt pick the GPUs, so they take no "
                         "other --gpu; give one of --gpu any, --gpus N, or --gpu BDF (repeated)")
    if ppcie:
        raise InputError("--ppcie passes a whole HGX board through: name its GPUs with --gpu "
                         "BDF (or none for all), not --gpu any / --gpus N")
    if allow_shared:  # a pick gives a free GPU: sharing one is a choice made by name
        raise InputError("--allow-shared gives a GPU another domain holds, and --gpu any / "
                         "--gpus N pick free ones; name the shared GPU with --gpu BDF instead")
    return count or 1


@contextmanager
def _picked(session, count: int, tdx: bool, managed: bool, mmio_window: str | None,
            to_stderr: bool):
    """The session of the host that gives ``count`` free GPUs and those GPUs, their pick
    locks held until the block ends (tdxvirt.lifecycle.fleet: offer, choose, claimed); the choice
    and why are printed. A host whose free GPUs other tdxvirt processes took meanwhile
    is passed over for the next."""
    from ..errors import HostNotReadyError
    from ..lifecycle import fleet
    from ..textsafe import safe
    from ..virt.conn import host_of

    sessions = session.each_host() or [session]

    def question(each):
        conn = each.conn()
        facts = each.facts(conn)
        return fleet.offer(facts, conn, count, tdx=tdx, managed=managed,
                           mmio_window=mmio_window, read_modes=facts.mode_reader())

    answers = fleet.ask_each(sessions, lambda s: fleet.Host(s.label or s.uri, s.uri), question,
                             timeout=session.host_timeout)
    try:
        ranked = fleet.choose(answers)
    except BaseException:
        _close_answered(sessions, answers)
        raise
    taken = []  # hosts whose free GPUs went to other tdxvirt processes meanwhile
    for answer in ranked:
        chosen = next(s for s, a in zip(sessions, answers) if a is answer)
        with fleet.claimed(chosen.conn(), host_of(chosen.uri), answer.value.free,
                           count) as gpus:
            if gpus is None:
                taken.append(answer.host.label)
                continue
            _close_answered([s for s in sessions if s is not chosen], answers)
            noun = "GPU" if count == 1 else "GPUs"
            click.echo(f"Picked {noun} {', '.join(gpus)} on {safe(answer.host.label)}: "
                       f"{safe(answer.value.why)}", err=to_stderr)
            for other in answers:
                if other is not answer:
                    why = other.error or (other.value.why if other.value is not None else "")
                    if other.host.label in taken:
                        why = "its free GPUs were taken by another tdxvirt meanwhile"
                    click.echo(f"  passed over {safe(other.host.label)}: {safe(why)}",
                               err=to_stderr)
            yield chosen, gpus
            return
    _close_answered(sessions, answers)
    raise HostNotReadyError(f"no host can take this TD: the free GPUs of {', '.join(taken)} "
                            "were taken by other tdxvirt processes meanwhile; run it again "
                            "once they are done, or free a GPU")


def _close_answered(sessions, answers) -> None:
    """Close the connections of the hosts that answered; one still waiting (a late
    answer) is left to its thread, which a close from here would race with."""
    for each, answer in zip(sessions, answers):
        if not answer.late:
            each.close()


def _describe(td, uri: str) -> None:
    from ..textsafe import safe

    plan = td.plan
    kind, how = ("VM", "plain, no TDX") if plan.dialect == "plain" else ("TD", f"{plan.dialect} dialect")
    click.echo(f"Defined {kind} '{safe(plan.name)}' at {safe(uri)} ({how})")
    for hostdev in plan.hostdevs:
        mode = "managed" if plan.managed else "unmanaged"
        vfio = "iommufd" if plan.iommufd else "legacy VFIO"
        click.echo(f"  {'NVSwitch' if hostdev.kind == 'nvswitch' else 'GPU'} {hostdev.source}: "
                   f"{mode} hostdev, {vfio}, root port {hostdev.guest_bus}")
    policy = f", TDX policy {plan.policy_hex}" if plan.tdx else ""
    click.echo(f"  {plan.vcpus} vCPUs, {plan.memory_kib // 1024} MiB{policy}")
    firmware = f"firmware {safe(plan.loader)} (ROM)" if plan.loader else (
        "firmware via -bios" if plan.dialect == "qemu-args" else
        "TDX firmware chosen by libvirt on the host (descriptor feature intel-tdx)" if plan.tdx
        else "firmware chosen by libvirt (UEFI)")
    click.echo(f"  {firmware}, 64-bit MMIO window {plan.mmio_mb} MiB")
    if plan.disk:
        made = (f" (new overlay on {safe(plan.disk.overlay_base)}, {plan.disk.base_format})"
                if plan.disk.overlay_base else f" ({plan.disk.format})")
        click.echo(f"  disk {safe(plan.disk.path)}{made}")
    if plan.seed:
        click.echo(f"  cloud-init seed {safe(plan.seed)} (new)")


def _warn(warnings) -> None:
    from ..textsafe import safe
    from .remedies import targeted

    for warning in warnings:
        click.echo(f"tdxvirt: warning: {safe(targeted(warning))}", err=True)


@main.command()
@click.argument("name", shell_complete=_td_names)
@click.option("--skip-preflight", is_flag=True, help="Start without the safety checks.")
@click.option("--console", is_flag=True, help="Attach to the serial console after starting.")
@click.option("--gpu-tool", metavar="PATH",
              help="NVIDIA's gpu-admin-tools (script or nvtrust checkout) to read CC modes.")
@pass_session
def start(session, name, skip_preflight, console, gpu_tool):
    """Start a TD after checking what would make it fail or run unprotected."""
    from ..lifecycle import tds

    domain = tds.lookup(session.conn(), name)
    shown = _quoted(domain.name())
    facts = session.facts()  # CC modes: read on this machine only, never for another host
    read_modes = None if skip_preflight else facts.mode_reader(gpu_tool)
    if tds.start(session.conn(), facts, domain, skip_preflight=skip_preflight,
                 read_modes=read_modes):
        click.echo(f"Started {shown}")
    else:
        click.echo(f"{shown} is already running; nothing to do")
    if console:
        _console(session.uri, domain.UUIDString())


@main.command()
@click.argument("name", shell_complete=_td_names)
@click.option("--timeout", type=click.FloatRange(min=0), default=120, show_default=True,
              help="Seconds to wait for the guest to power off.")
@click.option("--force", is_flag=True, help="Destroy the TD if it has not stopped by then.")
@pass_session
def stop(session, name, timeout, force):
    """Shut a TD down through ACPI and wait for it to power off."""
    from ..lifecycle import tds

    domain = tds.lookup(session.conn(), name)
    label = _quoted(domain.name())
    shown = [0]

    def progress(elapsed):
        if elapsed >= shown[0] + 5:  # a line every 5 s, on stderr
            shown[0] = int(elapsed)
            click.echo(f"tdxvirt: waiting for {label} to power off ({shown[0]}/{timeout:g} s)",
                       err=True)

    if tds.stop_or_destroy(session.conn(), domain, timeout, force, progress) == "stopped":
        click.echo(f"{label} is shut off")
        return
    click.echo(f"{tds.resolved(domain)} did not power off within {timeout:g} s; destroyed it")


@main.command()
@click.argument("name", shell_complete=_td_names)
@pass_session
def destroy(session, name):
    """Power a TD off at once (like pulling the plug)."""
    from ..lifecycle import tds

    domain = tds.lookup(session.conn(), name)
    if tds.destroy(session.conn(), domain):
        click.echo(f"Destroyed {tds.resolved(domain)}")
    else:
        click.echo(f"{tds.resolved(domain)} is not running; nothing to do")


@main.command()
@click.argument("name", shell_complete=_td_names)
@pass_session
def reboot(session, name):
    """Reboot a TD (a TD cannot be reset: libvirt restarts its QEMU process)."""
    from ..lifecycle import tds

    domain = tds.lookup(session.conn(), name)
    tds.reboot(session.conn(), domain)
    click.echo(f"Asked {_quoted(domain.name())} to reboot; a TD cannot reset, so libvirt starts a new "
               "QEMU process for it (a new TD, measured afresh)")


@main.command()
@click.argument("name", shell_complete=_td_names)
@click.option("--remove-storage", is_flag=True,
              help="Also delete the disk overlay and cloud-init seed tdxvirt created (never a base image).")
@click.option("--dry-run", is_flag=True,
              help="Run every check and say what would be undefined and deleted; change nothing.")
@pass_session
def undefine(session, name, remove_storage, dry_run):
    """Remove a stopped TD's definition."""
    from ..lifecycle import tds
    from ..textsafe import safe

    if not dry_run:  # an interrupted define or undefine first: it may be this very name's
        _warn(tds.recover_interrupted(session.conn()))
    domain = tds.lookup(session.conn(), name)
    identity = tds.resolved(domain)  # read before: an undefined domain has no name to ask
    removed = tds.undefine(session.conn(), domain, remove_storage=remove_storage, dry_run=dry_run)
    click.echo(f"Would undefine {identity}" if dry_run else f"Undefined {identity}")
    for path in removed:
        click.echo(f"  {'would remove' if dry_run else 'removed'} {safe(path)}")
    if dry_run:
        click.echo("(dry run: nothing was changed)")


@main.command()
@click.option("--dry-run", is_flag=True, help="List the interrupted changes; change nothing.")
def recover(dry_run):
    """Finish or undo defines and undefines that were killed midway (on this machine).

    Each was written down before its first step; libvirt, asked by the domain's UUID,
    says whether it happened: an undefine that happened gets its files deleted, a define
    that did not gets its files removed, anything libvirt holds is kept. The next define
    or undefine does the same by itself."""
    from ..lifecycle import journal
    from ..textsafe import safe

    waiting = journal.pending()
    if dry_run:
        for _, intent in waiting:
            click.echo(f"would ask {safe(intent.uri)} about the interrupted {intent.op} of "
                       f"{safe(repr(intent.name))} ({intent.uuid}): "
                       + safe(", ".join(intent.files) or "no files"))
        click.echo("Nothing was interrupted" if not waiting else "(dry run: nothing was changed)")
        return
    done = journal.recover()
    for line in done:
        click.echo(safe(line))
    if not done:
        click.echo("Nothing was interrupted" if not journal.pending() else
                   "Interrupted changes remain: libvirt could not be asked, or a tdxvirt is still "
                   "running them; run `tdxvirt recover` again later")


@main.command()
@click.argument("name", shell_complete=_td_names)
@click.option("--disable", is_flag=True, help="Do not start it with the host.")
@pass_session
def autostart(session, name, disable):
    """Start a TD when the host (libvirt) starts."""
    from ..lifecycle import tds

    domain = tds.lookup(session.conn(), name)
    tds.set_autostart(session.conn(), domain, not disable)
    click.echo(f"Autostart of {_quoted(domain.name())} {'disabled' if disable else 'enabled'}")


@main.command()
@click.argument("name", shell_complete=_td_names)
@click.option("--inactive", is_flag=True, help="The persistent definition, not the live XML.")
@pass_session
def xml(session, name, inactive):
    """Print a TD's domain XML."""
    from ..lifecycle import tds

    text = tds.domain_xml(session.conn(), name, inactive=inactive)
    if sys.stdout.isatty():  # a terminal acts on ESC, CR or bidi marks libvirt let in
        from ..textsafe import terminal_lines

        text = terminal_lines(text)
    click.echo(text, nl=False)  # piped: libvirt's XML byte for byte, like virsh dumpxml


@main.command()
@click.argument("name", shell_complete=_td_names)
@pass_session
def console(session, name):
    """Attach to a TD's serial console (hands over to `virsh console`)."""
    from ..lifecycle import tds

    domain = tds.lookup(session.conn(), name)  # a clear error before handing over
    _console(session.uri, domain.UUIDString())  # virsh resolves a UUID to that domain only


def _quoted(name: str) -> str:
    from ..textsafe import quoted

    return quoted(name)


def _console(uri: str, uuid: str) -> None:
    """Hand over to `virsh console` with the resolved domain's UUID, never the text the
    user typed (virsh would look that up again, by ID first, then UUID, then name)."""
    import os
    import shutil

    from ..errors import HostNotReadyError

    virsh = shutil.which("virsh")
    if virsh is None:
        raise HostNotReadyError("virsh is not installed (Debian: libvirt-clients); it provides the console")
    os.execv(virsh, [virsh, "-c", uri, "console", uuid])


def _defined_as(tdx_now: bool, dialect: str | None) -> str:
    """"TDX" or "plain": what the domain was defined as (tdxvirt's metadata), else what
    its XML is; the table's TYPE and JSON's "type" (JSON's "tdx": what the XML is now)."""
    return "TDX" if tdx_now or (dialect or "plain") != "plain" else "plain"


def _records(rows):
    return [
        {
            "name": row.facts.name,
            "state": row.state,
            "type": _defined_as(row.facts.tdx, row.facts.dialect),
            "tdx": row.facts.tdx,
            "dialect": row.facts.dialect,
            "managed_by_tdxvirt": row.facts.managed_by_tdxvirt,
            "vcpus": row.facts.vcpus,
            "memory_mib": row.facts.memory_kib // 1024,
            "gpus": list(row.facts.gpus),
            "uptime_s": None if row.uptime is None else int(row.uptime),
            "problems": list(row.problems),
            # the table's '!': no longer the TD it was defined as (problems say how)
            "weakened": bool(row.problems),
        }
        for row in rows
    ]


def _json_lines(records: list[dict]) -> str:
    """A JSON array, one record per line: readable, and encoded by json's C encoder
    (indent= falls back to the pure-Python one, a quarter of list's time at 1,000 TDs)."""
    if not records:
        return "[]"
    return "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]"


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    minutes, _ = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h" if days else f"{hours}h{minutes:02d}m"


@main.command(name="list")
@click.option("--foreign", "include_foreign", is_flag=True,
              help="Also list TDX domains that other tools defined (a DEFINED BY column).")
@click.option("--all", "virsh_all", is_flag=True,
              help="Accepted as virsh spells it: shut-off TDs are always listed.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_session
def list_(session, include_foreign, virsh_all, as_json):
    """List TDs (running and shut off) with their state and GPUs."""
    from ..lifecycle import tds

    if session.several:
        _list_fleet(session, include_foreign, as_json)
        return
    records = _records(tds.list_tds(session.conn(), include_foreign=include_foreign))
    if as_json:
        click.echo(_json_lines(records))
        return
    if not records:
        hint = "" if include_foreign else " (--foreign also shows TDX domains other tools defined)"
        click.echo(f"No TDs at {session.uri}{hint}")
        return
    _print_tds(records, include_foreign)


def _print_tds(records: list[dict], include_foreign: bool, hosts: list[str] | None = None) -> None:
    """The TD table; ``hosts``: a HOST cell per record, first (a fleet)."""
    headers = ["NAME", "STATE", "TYPE", "DIALECT", "VCPUS", "MEMORY", "GPUS", "UPTIME"]
    from ..textsafe import table as safe_table

    # TYPE is what the TD was defined as (tdxvirt's metadata), marked '!' when its XML
    # no longer is that: `show` names what changed.
    table = [[r["name"], r["state"],
              r["type"] + (" !" if r["problems"] else ""), r["dialect"] or "-",
              r["vcpus"], f"{r['memory_mib']} MiB", " ".join(r["gpus"]) or "-",
              _duration(r["uptime_s"])] for r in records]
    if include_foreign:
        headers.append("DEFINED BY")
        for line, r in zip(table, records):
            line.append("tdxvirt" if r["managed_by_tdxvirt"] else "other")
    if hosts is not None:
        headers.insert(0, "HOST")
        for line, host in zip(table, hosts):
            line.insert(0, host)
    # Names and metadata come from libvirt, where others may have put CR, ESC or bidi
    # marks: every cell is escaped, so no value can move the cursor or forge a row.
    click.echo(safe_table(table, headers))
    if any(r["problems"] for r in records):
        click.echo("! no longer the TD it was defined as (weakened or broken by an edit); "
                   "`tdxvirt show NAME` names what changed; `start` refuses it")


def _ask_fleet(session, question) -> list:
    """``question(host session)`` on every host at once (tdxvirt.lifecycle.fleet.ask_each), each
    within the session's deadline (--host-timeout); each host that failed is one error
    line on stderr, after the others' output (_fleet_failed)."""
    from ..lifecycle.fleet import Host, ask_each

    sessions = session.each_host()
    answers = ask_each(sessions, lambda s: Host(s.label, s.uri), question,
                       timeout=session.host_timeout)
    _close_answered(sessions, answers)
    return answers


def fleet_error_records(answers) -> list[dict]:
    """One JSON record per host that failed, so JSON alone tells "no TDs there" from
    "no answer from there" (docs/fleet.md, docs/json.md)."""
    return [{"host": a.host.label, "uri": a.host.uri, "error": a.error}
            for a in answers if a.error is not None]


def _fleet_failed(answers) -> None:
    """The error line of each host that did not answer (escaped: libvirt's words from
    another host), then exit 1 if any."""
    from ..textsafe import safe

    failed = [a for a in answers if a.error is not None]
    for answer in failed:
        click.echo(f"tdxvirt: error: host {safe(answer.host.label)}: {safe(answer.error)}",
                   err=True)
    if failed:
        click.get_current_context().exit(1)


def _list_fleet(session, include_foreign: bool, as_json: bool) -> None:
    """`list` on several hosts: one table (or JSON array) with each TD's host first."""
    from ..lifecycle import tds

    answers = _ask_fleet(session, lambda each: _records(
        tds.list_tds(each.conn(), include_foreign=include_foreign)))
    records, hosts = [], []
    for answer in answers:
        for record in answer.value or ():
            records.append({"host": answer.host.label, "uri": answer.host.uri, **record})
            hosts.append(answer.host.label)
    if as_json:
        click.echo(_json_lines(records + fleet_error_records(answers)))
    elif records:
        _print_tds(records, include_foreign, hosts)
    else:
        answered = sum(a.error is None for a in answers)
        hint = "" if include_foreign else " (--foreign also shows TDX domains other tools defined)"
        click.echo(f"No TDs on the {answered} host(s) that answered{hint}")
    _fleet_failed(answers)


@main.command()
@click.argument("name", shell_complete=_td_names)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_session
def show(session, name, as_json):
    """Show a TD as tdxvirt understands it from its domain XML."""
    from ..lifecycle import tds

    conn = session.conn()
    info = tds.show(conn, name, session.facts(conn))
    record = {**_records([info.row])[0], "uuid": info.uuid, "title": info.title,
              "record": info.record, "autostart": info.autostart,
              "persistent": info.persistent, "overlay": info.row.facts.overlay,
              "seed": info.row.facts.seed, **info.measurements,
              "builds": list(info.builds), "recorded_files": list(info.files),
              "recorded_files_note": info.files_note, "problems": list(info.problems),
              "weakened": bool(info.problems), "disks": list(info.disks),
              "interfaces": list(info.interfaces)}
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    _show_text(record)


_RECORD_WORDS = {"recorded": "recorded by root at define", "adopted": "adopted by root"}


def _show_text(r: dict) -> None:
    """`show` as `virsh dominfo`, `domblklist --details` and `domiflist` put it, with what
    makes it a TD; every value from libvirt is escaped (textsafe)."""
    from ..textsafe import safe, table

    def line(label: str, value) -> None:
        click.echo(f"{label + ':':<16}{'-' if value in (None, '') else safe(value)}")

    kind = r["type"] + (f", {r['dialect']} dialect" if r["dialect"] not in (None, "plain") else "")
    if r["weakened"]:
        kind += " (no longer the TD it was defined as: see Problems)"
    line("Name", r["name"])
    line("UUID", r["uuid"])
    line("Title", r["title"])
    up = f", up {_duration(r['uptime_s'])}" if r["uptime_s"] is not None else ""
    line("State", r["state"] + up)
    line("Type", kind)
    line("Defined by", "tdxvirt" if r["managed_by_tdxvirt"] else "another tool")
    line("Root's record", _RECORD_WORDS.get(r["record"], r["record"]))
    line("CPU(s)", r["vcpus"])
    line("Memory", f"{r['memory_mib']} MiB")
    line("Persistent", "yes" if r["persistent"] else "no")
    line("Autostart", "enable" if r["autostart"] else "disable")
    line("GPUs", " ".join(r["gpus"]))
    for key, label in (("mrtd", "MRTD"), ("rtmr1", "RTMR1"), ("rtmr2", "RTMR2")):
        if r.get(key) or key == "mrtd":
            line(label, r.get(key) and f"{r[key]} (predicted at define)")
    if r["builds"]:
        line("Built by", ", ".join(r["builds"]))
    files = [f"{f['file']} {f['path']}: {f['detail']}" for f in r["recorded_files"]]
    if r["recorded_files_note"]:
        files.append(r["recorded_files_note"])
    line("Boot files", files[0] if files else None)
    for text in files[1:]:
        click.echo(" " * 16 + safe(text))
    made = {r["overlay"]: "tdxvirt's overlay", r["seed"]: "cloud-init seed"}
    rows = [[d["target"], d["device"], d["source"] or "-",
             ", ".join(w for w in (d["format"], "read-only" if d["readonly"] else None,
                                   made.get(d["source"])) if w) or "-"] for d in r["disks"]]
    click.echo("Disks:" if rows else "Disks:          none")
    if rows:
        click.echo(_indented(table(rows, ["Target", "Device", "Source", "Notes"])))
    nics = [[n["type"], n["source"] or "-", n["model"] or "-", n["mac"] or "-"]
            for n in r["interfaces"]]
    click.echo("NICs:" if nics else "NICs:           none")
    if nics:
        click.echo(_indented(table(nics, ["Type", "Source", "Model", "MAC"])))
    if not r["problems"]:
        line("Problems", "none")
    else:
        click.echo("Problems:")
        for problem in r["problems"]:
            click.echo(f"  - {safe(problem)}")


def _indented(text: str) -> str:
    return "\n".join("  " + row for row in text.splitlines())


@main.group()
def sim():
    """The simulated TDX host: the emulated TDX host's libvirt, the test driver, a fake host root."""


def _board_choices() -> list[str]:
    from ..sim.boards import BOARDS

    return list(BOARDS)


@sim.command(name="up")
@click.option("--install", is_flag=True,
              help="First install the simulated host if it is missing (debootstrap, apt).")
@click.option("--board", type=click.Choice(_board_choices()),
              help="The emulated TDX host's GPUs: h100 (one H100 at 38:00.0, the default) or "
                   "hgx-b200 (eight B200s and the ConnectX switch management). Kept for later "
                   "starts; changing it stops the host's TDs and starts it anew.")
def sim_up(install, board):
    """Start the simulated host's daemon and keeper if they are not running."""
    from ..sim import control

    if install:
        started = control.provision(log=lambda line: click.echo(f"sim: {line}"), board=board)
    else:
        started = control.up(board=board)
    click.echo(f"Started: {', '.join(started)}" if started else "The simulated host is up")


@sim.command(name="down")
def sim_down():
    """Stop the simulated host (its test-driver domains are forgotten)."""
    from ..sim import control

    stopped = control.down()
    click.echo(f"Stopped: {', '.join(stopped)}" if stopped else "Nothing was running")


@sim.command(name="restart")
@click.option("--boot", is_flag=True,
              help="Start it as after a host boot: libvirt autostarts the domains marked for it.")
def sim_restart(boot):
    """Restart the emulated TDX host's libvirtd (it rereads qemu.conf; TDs keep running)."""
    from ..sim import control

    control.restart(boot=boot)
    click.echo("Restarted the emulated TDX host's libvirtd" + (" as after a boot" if boot else ""))


@sim.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def sim_exec(command):
    """Run COMMAND in the emulated TDX host's network, as after logging in to that host
    (e.g. `tdxvirt sim exec -- ssh debian@192.168.122.10` reaches a TD on its virbr0).
    Only the network is the host's: the program, files and keys are this machine's."""
    import os

    from ..sim import control

    argv = control.exec_argv(list(command))
    os.execvp(argv[0], argv)  # its exit status is this command's


@sim.command(name="guest-image")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--ssh-key", "ssh_keys", multiple=True, metavar="FILE",
              help="Public key root logs in with over ssh (dropbear); repeatable.")
@click.option("--dry-run", is_flag=True, help="Say what would be downloaded and written.")
def sim_guest_image(path, ssh_keys, dry_run):
    """Build a small guest disk (qcow2) for TDs on the simulated host: Debian's signed shim,
    GRUB and kernel, busybox, qemu-ga, DHCP and ssh, from Debian packages. Use it with
    `define --image PATH --image-format qcow2`; `guest verify --wait` reaches it, root
    logs in on its console (`tdxvirt console`) and with --ssh-key's key over ssh."""
    import os

    from ..errors import InputError
    from ..guest.userdata import read_ssh_key_file
    from ..sim import guest

    keys = tuple(key for file in ssh_keys for key in read_ssh_key_file(file))  # checked, bounded

    target = os.path.abspath(path)
    if os.path.lexists(target):
        raise InputError(f"{target} already exists; remove it or give another path")
    if not os.path.isdir(os.path.dirname(target)):
        raise InputError(f"{os.path.dirname(target)} is not a directory; create it or give another path")
    packages = ", ".join((*guest.PACKAGES, guest.kernel_package()))
    if dry_run:
        click.echo(f"would download (apt-get download, nothing installed): {packages}")
        click.echo(f"would write {target} (qcow2, {guest.ESP_MIB + 1} MiB: one EFI system "
                   "partition) (dry run: nothing was changed)")
        return
    from pathlib import Path

    guest.build_guest_disk(Path(target), keys)
    click.echo(f"Wrote {target}: Debian's shim, GRUB and kernel ({packages.rsplit(', ', 1)[1]}) "
               "with busybox, qemu-ga and DHCP")


@sim.command(name="status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def sim_status(as_json):
    """Show whether the simulated host is installed and running."""
    from ..sim import control, layout

    status = control.status()
    if as_json:
        click.echo(json.dumps({
            "installed": status.installed, "daemon": status.daemon,
            "keeper_pid": status.keeper_pid or None, "host_root": str(layout().chroot),
            "board": status.board,
            "devices": str(layout().devices), "qemu_uri": status.uri,
            "test_uri": status.test_uri, "daemon_root": str(layout().chroot)}, indent=2))
        return
    click.echo(f"installed:  {'yes' if status.installed else 'no (run scripts/setup)'}")
    click.echo(f"daemon:     {'running' if status.daemon else 'stopped'}")
    click.echo(f"keeper:     {status.keeper_pid or 'stopped'}")
    click.echo(f"host root:  {layout().chroot} with {layout().devices}'s /sys, /dev, /proc")
    click.echo(f"board:      {status.board}")
    click.echo(f"qemu driver: {status.uri}")
    click.echo(f"test driver: {status.test_uri}")
    click.echo(f"daemon root: {layout().chroot}")
