"""Several hosts at once: which hosts `-c` / `--fleet` name, asking them all in
parallel, and picking a host and free GPUs for `define --gpu any` / `--gpus N`.

The rule (docs/fleet.md):

- ``-c URI`` may be given several times; a ``-c`` value that is not a URI (no ``://``)
  and is a name of the config file's ``[hosts]`` table stands for that host's URI
  (any other value goes to libvirt as it is, which knows its own URI aliases).
- ``--fleet`` names every host of ``[hosts]``, in the file's order (exclusive with -c).
- A host given twice is asked once. One host keeps every command as it always was.

Each host is asked in a thread of its own over a connection of its own (libvirt-python
releases the GIL during a call, so the waits on the hosts overlap). The answers come
back in the order the hosts were given; a host that cannot be reached, or is lost
mid-question, is an error line of its own and the other hosts still answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generic, Iterable, TypeVar
from urllib.parse import urlparse

from .errors import HostNotReadyError, InputError, TdxvirtError

T = TypeVar("T")
S = TypeVar("S")
# Hosts asked at the same moment at most; the others wait for a free slot.
MAX_PARALLEL = 32


@dataclass(frozen=True)
class Host:
    label: str  # the HOST column and messages: its [hosts] name, else the URI's host[:port]
    uri: str


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
    for name, uri in named:
        unique.setdefault(uri, name)  # a host given twice is asked once
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


def ask_each(items: list[S], host_of: Callable[[S], Host], question: Callable[[S], T]) -> list[Answer[T]]:
    """``question(item)`` for every item at once, each in its own thread; answers in
    the items' order. A tdxvirt error (a host unreachable, lost, refusing) or a libvirt
    error is that host's answer; anything else is a bug and is raised here."""
    import threading

    from .conn import libvirt_error_type, translate

    error_type = libvirt_error_type()  # the bindings, or their one-line error (tdxvirt.conn)

    def answer(item: S) -> Answer[T]:
        host = host_of(item)
        try:
            return Answer(host, value=question(item))
        except TdxvirtError as error:
            return Answer(host, error=str(error))
        except error_type as error:  # one the library did not wrap: still one line
            # (a transport gone reads "...: lost the libvirt connection: ...")
            return Answer(host, error=str(translate(error, f"libvirt at {host.uri}")))

    # Daemon threads, not concurrent.futures: Ctrl-C then ends tdxvirt at once even while
    # a host still has not answered (its ssh may wait minutes), and nothing to import.
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
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for value in answers:
        if isinstance(value, BaseException):
            raise value
    return answers


# ---------------------------------------------------------------- choosing free GPUs


@dataclass
class Offer:
    """What one host offers a new TD: GPUs it can give (empty: it cannot), and why."""

    gpus: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)  # why chosen, or why not

    @property
    def why(self) -> str:
        return "; ".join(self.reasons)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def offer(facts, conn, count: int, tdx: bool = True, managed: bool = True,
          mmio_window: str | None = None, read_modes=None) -> Offer:
    """The first ``count`` free GPUs of the host ``facts`` describe, in address order.

    Free: an NVIDIA GPU (not an NVSwitch) that no domain defined there passes through
    (tdxvirt.assemble.all_gpu_holders), on vfio-pci unless libvirt manages the binding
    (--managed, the default), with BAR sizes known or --mmio-window given, and in the
    CC mode the TD needs (on for a TD, off for a plain VM) where ``read_modes`` can tell;
    unknown modes (another host: NVIDIA's tool runs only on its own host) are said.
    The host also needs TDX on for a TD (unknown, as libvirt's test driver leaves it,
    is said; libvirt and start's preflight check it again)."""
    from .assemble import all_gpu_holders
    from .host.nvidia import GPU, kind_of
    from .textsafe import quoted  # domain names are whatever that host's libvirt holds

    notes = []
    if tdx:
        enabled = facts.tdx_enabled()
        if enabled is False:
            return Offer(reasons=[facts.tdx_problem() or f"TDX is off on {facts.where}"])
        notes.append("TDX on" if enabled else "TDX support unknown (libvirt there does not "
                     "report it; define and start check it again)")
    gpus = [d for d in facts.nvidia_devices() if kind_of(d) == GPU]
    if not gpus:
        return Offer(reasons=[f"no NVIDIA GPU on {facts.where}"])
    holders = all_gpu_holders(conn)
    refused: dict[str, list[str]] = {}

    def refuse(device, why: str) -> None:
        refused.setdefault(why, []).append(str(device.address))

    free = []
    for device in gpus:
        held = holders.get(str(device.address))
        if held:
            refuse(device, "held by " + ", ".join(quoted(name) for name in held))
        elif not managed and device.driver != "vfio-pci":
            refuse(device, "not on vfio-pci (--no-managed)")
        elif device.bar_sizes is None and not mmio_window:
            refuse(device, "BAR sizes unknown to tdxvirt (--mmio-window sizes the window)")
        else:
            free.append(device)
    modes_known = read_modes is not None and free
    if modes_known:
        wanted = "on" if tdx else "off"
        modes = {r.address: r for r in read_modes(free)}
        kept = []
        for device in free:
            result = modes.get(str(device.address))
            if result is not None and result.ok and result.cc_mode and result.cc_mode != wanted:
                refuse(device, f"CC mode {result.cc_mode}, {wanted} needed")
            else:
                kept.append(device)
        free = kept
    refusals = [f"{', '.join(addresses)} {why}" for why, addresses in refused.items()]
    if len(free) < count:
        return Offer(reasons=[f"{_plural(len(free), 'free GPU')} of {len(gpus)}, "
                              f"{count} wanted"] + refusals)
    chosen = free[:count]
    notes.append("not held by any domain there, " + (
        "libvirt binds each to vfio-pci at start" if managed else "on vfio-pci"))
    if read_modes is None:
        notes.append(f"CC mode unknown from here (`tdxvirt gpu cc-mode` on {facts.where})"
                     if facts.remote else "CC mode unknown (NVIDIA's tool cannot run here: "
                     "not root, or not installed); start's preflight reads it")
    else:
        notes.append(f"CC mode {'on' if tdx else 'off'} where read")
    return Offer([str(d.address) for d in chosen], notes)


def choose(answers: list[Answer[Offer]]) -> tuple[Host, Offer]:
    """The first host (in the order given) that offers the GPUs; else one error naming
    why each host was passed over."""
    for answer in answers:
        if answer.value is not None and answer.value.gpus:
            return answer.host, answer.value
    why = [f"{a.host.label}: {a.error or a.value.why}" for a in answers]
    raise HostNotReadyError("no host can take this TD (" + " | ".join(why) + "); free a GPU "
                            "(`tdxvirt gpu list` shows which domain holds each) or add a host")
