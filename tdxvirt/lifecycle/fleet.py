"""Several hosts at once: which hosts `-c` / `--fleet` name, asking them all in
parallel, and picking a host and free GPUs for `define --gpu any` / `--gpus N`.

The rule (docs/fleet.md):

- ``-c URI`` may be given several times; a ``-c`` value that is not a URI (no ``://``)
  and is a name of the config file's ``[hosts]`` table stands for that host's URI
  (any other value goes to libvirt as it is, which knows its own URI aliases).
- ``--fleet`` names every host of ``[hosts]``, in the file's order (exclusive with -c).
- A host given twice is asked once: URIs are compared after normalising what does not
  change the host (``same_host_key``). One host keeps every command as it always was.
- Each host answers within a deadline (``--host-timeout``, DEFAULT_TIMEOUT): a host
  that hangs (a silent listener, an ssh waiting on a prompt) is its own error line.

Each host is asked in a thread of its own over a connection of its own (libvirt-python
releases the GIL during a call, so the waits on the hosts overlap). The answers come
back in the order the hosts were given; a host that cannot be reached, or is lost
mid-question, is an error line of its own and the other hosts still answer.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Generic, Iterable, TypeVar
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

from ..errors import HostNotReadyError, InputError, TdxvirtError

T = TypeVar("T")
S = TypeVar("S")
# Hosts asked at the same moment at most; the others wait for a free slot.
MAX_PARALLEL = 32
# Seconds a host has to answer a fleet question (--host-timeout): an ssh login, a
# libvirt open and a few reads take a second or two on a healthy host.
DEFAULT_TIMEOUT = 30.0
# libvirt's default ports per transport (libvirt docs/uri.rst, "Remote URIs"): a URI
# naming one is the same host as one naming none.
_DEFAULT_PORTS = {"ssh": 22, "libssh2": 22, "libssh": 22, "tcp": 16509, "tls": 16514}


@dataclass(frozen=True)
class Host:
    label: str  # the HOST column and messages: its [hosts] name, else the URI's host[:port]
    uri: str

    @property
    def connect_uri(self) -> str:
        """The URI tdxvirt opens: ``uri`` with ssh never prompting (with_no_tty)."""
        return with_no_tty(self.uri)


def _transport(scheme: str) -> str:
    """``ssh`` of ``qemu+ssh``; ``tls`` (libvirt's default) for a remote URI without one."""
    return scheme.partition("+")[2].lower() or "tls"


def with_no_tty(uri: str) -> str:
    """An ssh URI with libvirt's ``no_tty=1`` added when it has no ``no_tty`` of its own.

    Several hosts are asked at once, so two ssh password or host-key prompts would
    share one terminal and interleave. libvirt's remote driver then runs ssh with
    ``-T -o BatchMode=yes`` (libvirt docs/uri.rst "no_tty"; src/rpc/virnetsocket.c):
    a host that needs a prompt fails at once with ssh's reason instead. Only the ssh
    transport runs ssh; libssh2 and libssh ask through libvirt's auth callback."""
    try:
        parsed = urlparse(uri)
    except ValueError:
        return uri
    if _transport(parsed.scheme) != "ssh" or not parsed.hostname:
        return uri
    query = parse_qsl(parsed.query, keep_blank_values=True)
    if any(key == "no_tty" for key, _ in query):
        return uri  # the user's own choice
    return urlunparse(parsed._replace(query=urlencode([*query, ("no_tty", "1")])))


def same_host_key(uri: str) -> str:
    """What two URIs of one host share, so a host given twice is asked once.

    Normalised: scheme and host name to lower case, the transport's default port
    dropped, a trailing ``/`` of the path dropped, query parameters sorted (and
    ``no_tty``, which changes no host, dropped), and ``user@`` dropped for a
    ``/system`` path (one daemon whoever logs in; a ``/session`` URI is that user's
    own daemon, so its user is kept). Names are never resolved: ``gpu-a`` and its IP
    address stay two hosts (docs/fleet.md)."""
    try:
        parsed = urlparse(uri)
        port = parsed.port
    except ValueError:
        return uri
    if "://" not in uri:
        return uri  # a libvirt alias: libvirt resolves it
    host = (parsed.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal keeps its brackets
    if port is not None and port != _DEFAULT_PORTS.get(_transport(parsed.scheme)):
        host += f":{port}"
    path = parsed.path.rstrip("/") or "/"
    user = parsed.username if parsed.username and path != "/system" else None
    netloc = f"{user}@{host}" if user else host
    query = sorted((k, v) for k, v in parse_qsl(parsed.query, keep_blank_values=True)
                   if k != "no_tty")
    return urlunparse((parsed.scheme.lower(), netloc, path, "", urlencode(query), ""))


def _uri_host(uri: str) -> str | None:
    try:
        parsed = urlparse(uri)
        return parsed.netloc.rsplit("@", 1)[-1] or None  # host[:port], without the user
    except ValueError:
        return None


def resolve(connects: Iterable[str], fleet: bool, config_loader: Callable) -> list[Host]:
    """The hosts `-c` (several times) or `--fleet` name, in the order given; [] when
    neither is given (the default URI applies). The config file is read only when a
    value needs it (a name, or --fleet), so `-c URI` alone works as it always did."""
    connects = list(connects)
    if fleet and connects:
        raise InputError("--fleet names every host of the config file's [hosts] and -c names "
                         "hosts itself; give one or the other")
    named: list[tuple[str | None, str]] = []
    if fleet:
        hosts = config_loader().hosts
        if not hosts:
            raise InputError("--fleet: the config file has no [hosts] table (docs/fleet.md: "
                             "name = \"qemu+ssh://root@gpu-a/system\"); or give -c several times")
        named = [(name, uri) for name, uri in hosts]
    else:
        config = None
        for value in connects:
            if "://" not in value:
                config = config or config_loader()
                uri = config.host_uri(value)
                named.append((value, uri) if uri else (None, value))  # a libvirt alias
            else:
                named.append((None, value))
    unique: dict[str, str | None] = {}
    seen: set[str] = set()
    for name, uri in named:
        key = same_host_key(uri)
        if key not in seen:  # a host given twice is asked once, as it was first given
            seen.add(key)
            unique[uri] = name
    labels = {uri: name or _uri_host(uri) or uri for uri, name in unique.items()}
    shared = {label for label in labels.values() if list(labels.values()).count(label) > 1}
    # Two URIs on one host (two sockets, two drivers) keep apart by their whole URI.
    return [Host(uri if labels[uri] in shared else labels[uri], uri) for uri in unique]


@dataclass
class Answer(Generic[T]):
    """One host's answer to a fleet question: its value, or why it has none."""

    host: Host
    value: T | None = None
    error: str | None = None  # one line: what went wrong there (libvirt's words included)
    late: bool = False  # no answer within the deadline: its thread may still be waiting


def no_answer(timeout: float) -> str:
    return (f"no answer within {timeout:g} s; check that the host is up and its libvirt "
            "answers (--host-timeout S waits longer)")


def ask_each(items: list[S], host_of: Callable[[S], Host], question: Callable[[S], T],
             timeout: float = DEFAULT_TIMEOUT) -> list[Answer[T]]:
    """``question(item)`` for every item at once, each in its own thread; answers in
    the items' order. A tdxvirt error (a host unreachable, lost, refusing) or a libvirt
    error is that host's answer; anything else is a bug and is raised here. A host
    that has not answered ``timeout`` seconds after the start is a ``late`` answer."""
    import threading
    import time

    from ..virt.conn import libvirt_error_type, translate

    error_type = libvirt_error_type()  # the bindings, or their one-line error (tdxvirt.virt.conn)

    def answer(item: S) -> Answer[T]:
        host = host_of(item)
        try:
            return Answer(host, value=question(item))
        except TdxvirtError as error:
            return Answer(host, error=str(error))
        except error_type as error:  # one the library did not wrap: still one line
            # (a transport gone reads "...: lost the libvirt connection: ...")
            return Answer(host, error=str(translate(error, f"libvirt at {host.uri}")))
        except (ValueError, LookupError, SyntaxError) as error:  # lxml's parse errors too
            # a host's own XML that tdxvirt cannot read (<vcpu>four</vcpu>, a broken node
            # device) is that host's answer: the other hosts are still shown
            from ..textsafe import safe

            return Answer(host, error=f"{host.uri} answered with XML tdxvirt cannot read "
                                      f"({type(error).__name__}: {safe(str(error))[:200]}); "
                                      "check that host's libvirt")

    # Daemon threads, not concurrent.futures: a host that never answers (a silent
    # listener, an ssh that waits minutes) is left waiting in its thread, which ends with
    # tdxvirt; the pool's exit would wait for it (and so would Ctrl-C).
    answers: list = [None] * len(items)
    slots = threading.BoundedSemaphore(MAX_PARALLEL)

    def run(index: int, item: S) -> None:
        with slots:
            try:
                answers[index] = answer(item)
            except BaseException as error:  # a bug (or a test's guard): raised below
                answers[index] = error

    threads = [threading.Thread(target=run, args=(index, item), daemon=True,
                                name=f"tdxvirt-host-{index}")
               for index, item in enumerate(items)]
    deadline = time.monotonic() + timeout  # one for all: hosts are asked at once
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    result = []
    for item, value in zip(items, list(answers)):  # read once: a late answer stays late
        if isinstance(value, BaseException):
            raise value
        result.append(value if value is not None
                      else Answer(host_of(item), error=no_answer(timeout), late=True))
    return result


# ---------------------------------------------------------------- choosing free GPUs


@dataclass
class Offer:
    """What one host offers a new TD: GPUs it can give (empty: it cannot), and why."""

    gpus: list[str] = field(default_factory=list)  # the first free ones, as many as wanted
    reasons: list[str] = field(default_factory=list)  # why chosen, or why not
    remedies: list[str] = field(default_factory=list)  # what would make a host qualify
    free: list[str] = field(default_factory=list)  # every free GPU: the next if one is taken
    tdx_known: bool = False  # the host's libvirt reports TDX on (not merely "unknown")

    @property
    def why(self) -> str:
        return "; ".join(self.reasons)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"




def offer(facts, conn, count: int, tdx: bool = True, managed: bool = True,
          mmio_window: str | None = None, read_modes=None) -> Offer:
    """The first ``count`` free GPUs of the host ``facts`` describe, in address order.

    Free: an NVIDIA GPU (not an NVSwitch) that no domain defined there passes through
    (tdxvirt.lifecycle.assemble.all_gpu_holders), on vfio-pci unless libvirt manages the binding
    (--managed, the default), with BAR sizes known or --mmio-window given, and in a CC
    mode start's preflight accepts (TD_CC_MODES, PLAIN_CC_MODES) where ``read_modes``
    can tell; unknown modes (another host: NVIDIA's tool runs only on its own host) are
    said. The host also needs TDX on for a TD (unknown, as libvirt's test driver leaves
    it, is said; libvirt and start's preflight check it again). Each refusal carries
    the remedy that fits it, for the error when no host qualifies (choose)."""
    from ..host.nvidia import GPU, kind_of
    from ..textsafe import quoted  # domain names are whatever that host's libvirt holds
    from .assemble import all_gpu_holders

    notes = []
    enabled = facts.tdx_enabled() if tdx else None
    if tdx:
        if enabled is False:
            return Offer(reasons=[facts.tdx_problem() or f"TDX is off on {facts.where}"],
                         remedies=[f"enable TDX on {facts.where} (`tdxvirt host check` there "
                                   "names what is missing; `tdxvirt host setup` sets it up)"])
        notes.append("TDX on" if enabled else "TDX support unknown (libvirt there does not "
                     "report it; define and start check it again)")
    gpus = [d for d in facts.nvidia_devices() if kind_of(d) == GPU]
    if not gpus:
        return Offer(reasons=[f"no NVIDIA GPU on {facts.where}"],
                     remedies=["add a host with a free GPU (-c, or [hosts] with --fleet)"])
    holders = all_gpu_holders(conn)
    refused: dict[str, list[str]] = {}
    remedies: dict[str, str] = {}  # refusal -> its remedy

    def refuse(device, why: str, remedy: str) -> None:
        refused.setdefault(why, []).append(str(device.address))
        remedies.setdefault(why, remedy)

    free = []
    for device in gpus:
        held = holders.get(str(device.address))
        if held:
            refuse(device, "held by " + ", ".join(quoted(name) for name in held),
                   "free a GPU (`tdxvirt gpu list` shows which domain holds each; "
                   "`tdxvirt undefine` one)")
        elif not managed and device.driver != "vfio-pci":
            refuse(device, "not on vfio-pci (--no-managed)",
                   "`tdxvirt gpu detach BDF` on that host, or leave out --no-managed")
        elif device.bar_sizes is None and not mmio_window:
            refuse(device, "BAR sizes unknown to tdxvirt (--mmio-window sizes the window)",
                   "give --mmio-window SIZE (e.g. 256G)")
        else:
            free.append(device)
    if read_modes is not None and free:
        from ..gpu.ccmode import PLAIN_CC_MODES, TD_CC_MODES  # what a start accepts

        accepted, wanted = (TD_CC_MODES, "on") if tdx else (PLAIN_CC_MODES, "off")
        modes = {r.address: r for r in read_modes(free)}
        kept = []
        for device in free:
            result = modes.get(str(device.address))
            if result is not None and result.ok and result.cc_mode not in accepted:
                refuse(device, f"CC mode {result.cc_mode}, {wanted} needed",
                       f"`tdxvirt gpu cc-mode BDF --set {wanted}` on that host")
            else:
                kept.append(device)
        free = kept
    refusals = [f"{', '.join(addresses)} {why}" for why, addresses in refused.items()]
    if len(free) < count:
        return Offer(reasons=[f"{_plural(len(free), 'free GPU')} of {len(gpus)}, "
                              f"{count} wanted"] + refusals,
                     remedies=list(remedies.values()) or [
                         "add a host with enough GPUs (-c, or [hosts] with --fleet)"])
    notes.append("not held by any domain there, " + (
        "libvirt binds each to vfio-pci at start" if managed else "on vfio-pci"))
    if read_modes is None:
        notes.append(f"CC mode unknown from here (`tdxvirt gpu cc-mode` on {facts.where})"
                     if facts.remote else "CC mode unknown (NVIDIA's tool cannot run here: "
                     "not root, or not installed); start's preflight reads it")
    else:
        notes.append(f"CC mode {'on (or devtools)' if tdx else 'off'} where read")
    addresses = [str(d.address) for d in free]
    return Offer(addresses[:count], notes, free=addresses, tdx_known=enabled is True)


def choose(answers: list[Answer[Offer]]) -> list[Answer[Offer]]:
    """The hosts that offer the GPUs, the one to try first first: for a TD, hosts whose
    libvirt reports TDX on before those where it is unknown (a TD there may still fail
    to start for want of TDX), each group in the order given. None: one error naming
    why each host was passed over and the remedies that fit those reasons."""
    offering = [a for a in answers if a.value is not None and a.value.gpus]
    if offering:
        return sorted(offering, key=lambda a: not a.value.tdx_known)  # stable: given order
    why = [f"{a.host.label}: {a.error or a.value.why}" for a in answers]
    remedies: list[str] = []
    for answer in answers:
        fits = answer.value.remedies if answer.value is not None else [
            f"make {answer.host.label} reachable, or leave it out"]
        remedies += [r for r in fits if r not in remedies]
    raise HostNotReadyError("no host can take this TD (" + " | ".join(why) + "); to fix: "
                            + "; or ".join(remedies))


def pick_keys(lock_host: str, addresses) -> list[str]:
    """The keys a `define --gpu any` holds while it picks and defines (tdxvirt.locks):
    apart from define's own GPU keys, which define_td takes again itself (an flock is
    per open file, so one process taking one key twice would wait on itself)."""
    from .. import locks

    return [f"pick-{key}" for key in locks.gpu_keys(lock_host, addresses)]


@contextmanager
def claimed(conn, lock_host: str, candidates: list[str], count: int):
    """Hold the pick locks of ``count`` of ``candidates`` (in order) until the block
    ends; yields their addresses, or None when fewer are left. A candidate another
    tdxvirt is picking right now is skipped (its lock is tried, never waited on), and
    one a domain took since the offer was read (holders are read again under the lock)
    too, so parallel picks never give one GPU twice and a loser moves on."""
    from .. import locks
    from ..errors import DeviceBusyError
    from .assemble import all_gpu_holders

    with ExitStack() as stack:
        pending = iter(candidates)
        mine: list[str] = []
        while len(mine) < count:
            batch = []
            for address in pending:
                try:
                    stack.enter_context(locks.held(pick_keys(lock_host, [address]), timeout=0))
                except DeviceBusyError:
                    continue
                batch.append(address)
                if len(mine) + len(batch) == count:
                    break
            if not batch:
                break
            holders = all_gpu_holders(conn)  # under the locks: what is held now
            mine += [address for address in batch if not holders.get(address)]
        yield mine[:count] if len(mine) >= count else None
