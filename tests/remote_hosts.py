"""Remote hosts for the remote tests, over a real ssh transport on 127.0.0.1.

- ``Sshd``: an sshd on a free port of 127.0.0.1 that lets root in with a key of its
  own; libvirt's ssh transport then runs netcat to the simulated host's daemon socket
  on the far side, exactly as it reaches any remote host.
- ``NodeFile``: a libvirt test-driver node file (``test:///ABS/PATH/node.xml``) holding
  a host's PCI node devices, storage pools and domains, written inside the simulated
  host's daemon root (the daemon runs chrooted there, and opens the path itself).
  libvirt parses the file afresh for each connection: a connection sees only its own
  changes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def available() -> bool:
    return os.path.exists(SSHD) and bool(shutil.which("nc"))


class Sshd:
    def __init__(self, work: Path):
        self.work = work
        for key in ("hostkey", "client"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / key)],
                           check=True)
        self.port = 20000 + uuid.uuid4().int % 20000
        (work / "sshd_config").write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {work / 'hostkey'}",
            f"PidFile {work / 'sshd.pid'}", f"AuthorizedKeysFile {work / 'client.pub'}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "UsePAM no",
            "StrictModes no", "MaxStartups 100", ""]))
        os.makedirs("/run/sshd", exist_ok=True)
        self.process = subprocess.Popen([SSHD, "-D", "-f", str(work / "sshd_config"),
                                         "-E", str(work / "sshd.log")])
        deadline = time.monotonic() + 10
        while subprocess.run(["nc", "-z", "127.0.0.1", str(self.port)]).returncode != 0:
            assert time.monotonic() < deadline, (work / "sshd.log").read_text()
            time.sleep(0.1)

    def uri(self, driver: str, path: str, socket: Path) -> str:
        """``driver+ssh://root@127.0.0.1:PORT<path>`` for the daemon at ``socket``."""
        return (f"{driver}+ssh://root@127.0.0.1:{self.port}{path}?socket={socket}"
                f"&keyfile={self.work / 'client'}&no_verify=1")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


def pci_device(address: str, vendor: int, product: int, pci_class: int, group: int,
               members: tuple[str, ...] = (), numa: int | None = None,
               product_name: str = "", driver: str | None = None) -> str:
    """A PCI node device as libvirt's node device driver describes one."""
    domain, bus, rest = address.split(":")
    slot, function = rest.split(".")
    addresses = "".join(
        "<address domain='0x{}' bus='0x{}' slot='0x{}' function='0x{}'/>".format(
            *m.split(":")[:2], *m.split(":")[2].split("."))
        for m in (members or (address,)))
    return f"""  <device>
    <name>pci_{domain}_{bus}_{slot}_{function}</name>
    <parent>computer</parent>
    {f"<driver><name>{driver}</name></driver>" if driver else ""}
    <capability type='pci'>
      <class>{pci_class:#08x}</class>
      <domain>{int(domain, 16)}</domain><bus>{int(bus, 16)}</bus><slot>{int(slot, 16)}</slot><function>{int(function, 16)}</function>
      <product id='{product:#06x}'>{product_name}</product>
      <vendor id='{vendor:#06x}'>{"NVIDIA Corporation" if vendor == 0x10DE else "Vendor"}</vendor>
      <iommuGroup number='{group}'>{addresses}</iommuGroup>
      {"" if numa is None else f"<numa node='{numa}'/>"}
    </capability>
  </device>
"""


def volume(name: str, path: str, fmt: str, backing: str | None = None) -> str:
    backing_xml = (f"<backingStore><path>{backing}</path><format type='qcow2'/></backingStore>"
                   if backing else "")
    return f"""    <volume type='file'>
      <name>{name}</name>
      <capacity unit='bytes'>1073741824</capacity>
      <target><path>{path}</path><format type='{fmt}'/></target>
      {backing_xml}
    </volume>
"""


def pool(name: str, directory: str, volumes: tuple[str, ...]) -> str:
    return f"""  <pool type='dir'>
    <name>{name}</name>
    <uuid>{uuid.uuid4()}</uuid>
    <capacity unit='bytes'>107374182400</capacity>
    <allocation unit='bytes'>0</allocation>
    <available unit='bytes'>107374182400</available>
    <source/>
    <target><path>{directory}</path></target>
{"".join(volumes)}  </pool>
"""


# libvirt's 'default' network, as a Debian host has it (define's NIC goes on it)
DEFAULT_NETWORK = ("  <network><name>default</name><forward mode='nat'/><bridge name='virbr0'/>"
                   "<ip address='192.168.122.1' netmask='255.255.255.0'/></network>\n")


@dataclass
class NodeFile:
    """One simulated remote host: a node file inside the daemon's root."""

    daemon_root: Path
    name: str
    devices: tuple[str, ...] = ()
    pools: tuple[str, ...] = ()
    domains: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        """The file's path as the daemon sees it (inside its root)."""
        return f"/tmp/{self.name}/node.xml"

    def _as_the_daemon_sees(self, path: str) -> Path:
        """Where ``path`` of the daemon's root is on this machine: the emulated TDX host
        shares /tmp with it (tdxvirt.sim.onehost.shared_dirs), another root does not."""
        from tdxvirt.sim import layout

        if Path(self.daemon_root).resolve() == layout().chroot.resolve():
            return layout().host().path(path)
        return Path(self.daemon_root) / path.lstrip("/")

    def write(self) -> None:
        target = self._as_the_daemon_sees(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("<node>\n  <cpu><mhz>2400</mhz><model>x86_64</model><active>8</active>"
                          "<total>8</total><nodes>2</nodes><sockets>2</sockets><cores>4</cores>"
                          "<threads>1</threads></cpu>\n  <memory>67108864</memory>\n"
                          + "".join(self.domains) + "".join(self.devices) + "".join(self.pools)
                          + DEFAULT_NETWORK + "</node>\n")

    def remove(self) -> None:
        shutil.rmtree(self._as_the_daemon_sees(self.path).parent, ignore_errors=True)


# ---------------------------------------------------------------- fleets (tests/test_fleet.py, scripts/bench)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (sshd's per-connection children and their netcat),
    from /proc: how a test ends the sessions of an sshd it started, and only those."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cut(sshd: Sshd) -> None:
    """The host goes away: its sshd and every connection through it end at once, so
    libvirt's client sees the transport close mid-conversation, as when a host dies."""
    import signal

    pids = [sshd.process.pid, *descendants(sshd.process.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sshd.process.wait()


def td_domains(uri: str, tds: list[tuple[str, list[str], dict]]) -> list[str]:
    """TDs tdxvirt assembles from the host's own facts (``uri``), shut off, for its node
    file: (name, GPU addresses, further TDSpec options) each."""
    from lxml import etree

    from tdxvirt.domain.spec import TDSpec
    from tdxvirt.facts.libvirt import LibvirtFacts
    from tdxvirt.lifecycle import tds as library
    from tdxvirt.virt.conn import open_connection

    test_ns = "http://libvirt.org/schemas/domain/test/1.0"  # libvirt's test driver's own XML
    conn = open_connection(uri)
    try:
        facts = LibvirtFacts(conn, uri)
        made = []
        for name, gpus, options in tds:
            xml = library.assemble_td(conn, facts, TDSpec.from_user(
                name=name, gpus=gpus, remote=True, **options)).xml
            root = etree.fromstring(xml.encode())  # runs unless its run state says 5
            etree.SubElement(root, f"{{{test_ns}}}runstate", nsmap={"test": test_ns}).text = "5"
            made.append(etree.tostring(root, encoding="unicode") + "\n")
        return made
    finally:
        conn.close()


@dataclass
class RemoteHost:
    """A simulated remote host with an sshd of its own (so it can go away alone)."""

    node: NodeFile
    sshd: Sshd
    uri: str

    def stop(self) -> None:
        if self.sshd.process.poll() is None:
            self.sshd.stop()
        self.node.remove()


def remote_host(work: Path, daemon_root: Path, socket: Path, name: str,
                devices: tuple[str, ...], tds: list[tuple[str, list[str], dict]] = ()) -> RemoteHost:
    """A node file with ``devices`` and ``tds`` (td_domains), behind an sshd of its own."""
    node = NodeFile(daemon_root, name, devices=devices)
    node.write()
    work.mkdir(parents=True, exist_ok=True)
    sshd = Sshd(work)
    uri = sshd.uri("test", node.path, socket)
    if tds:
        node.domains = td_domains(uri, list(tds))
        node.write()
    return RemoteHost(node, sshd, uri)


def refuse(what: str):
    """A stand-in that fails the test when called: ``what`` it would have done here."""
    def refused(*args, **kwargs):
        raise AssertionError(f"{what} for a remote URI")
    return refused


def exploding_root(base: str):
    """This machine's host root for a remote URI: any read is a test failure."""
    from tdxvirt.host import HostRoot

    class ExplodingRoot(HostRoot):
        def _refuse(self, absolute, *_):
            raise AssertionError(f"read this machine's {absolute} for a remote URI")

        path = exists = read_text = read_value = link_name = listdir = _refuse

    return ExplodingRoot(base)


def forbid_local_reads(monkeypatch, base: str) -> None:
    """Make every read of this machine a test failure for what follows: the CLI's host
    root raises on any read (``base``: a root with no GPU), the local facts are never
    to be built, NVIDIA's tool never looked for, qemu-img never run, no build record
    or firmware descriptor read. For remote URIs nothing of this machine may be read."""
    from tdxvirt.cli import Session
    from tdxvirt.facts.local import LocalFacts

    monkeypatch.setattr(LocalFacts, "__init__", refuse("built this machine's facts"))
    monkeypatch.setattr(Session, "host", property(lambda self: exploding_root(base)))
    monkeypatch.setattr("tdxvirt.gpu.modes.mode_reader", refuse("looked for NVIDIA's tool here"))
    monkeypatch.setattr("tdxvirt.domain.policy.inspect_image", refuse("ran qemu-img here"))
    monkeypatch.setattr("tdxvirt.build.artifacts.recorded", refuse("read this machine's builds"))
    monkeypatch.setattr("tdxvirt.host.firmware.find_tdx_ovmf", refuse("read firmware descriptors"))
