"""Issue #15, fleet: several hosts asked at once, and `define --gpu any` picking one.

Simulated remote hosts, each libvirt's test driver loaded with a node file of its own
(served by the simulated host's daemon) behind an sshd of its own on 127.0.0.1, so one
host can go away alone; reached over libvirt's real ssh transport:

- gpu-a: H100 SXM5s (10de:2330, BAR sizes in tdxvirt's table) at 0000:17:00.0 (free,
  IOMMU group 7 with a PCIe port, NUMA node 1) and 0000:b8:00.0 (held by td-a).
- gpu-b: H200s (10de:233b, BAR sizes unknown to tdxvirt) at 0000:1a:00.0 (held by
  td-b), 0000:4c:00.0 and 0000:cb:00.0 (free).
- the emulated TDX host's real qemu driver (TDX on, no GPU) and libvirt 11.x's real
  qemu driver (no TDX), both through an sshd too.

This machine's host root has no GPU at all, and every way this machine could be read
for a remote URI fails the test (remote_hosts.forbid_local_reads).
"""

from __future__ import annotations

import json
import uuid

import pytest
from click.testing import CliRunner
from conftest import one_line_error
from remote_hosts import (
    Sshd,
    available,
    cut,
    forbid_local_reads,
    pci_device,
    remote_host,
)

from tdxvirt.cli import main
from tdxvirt.config import Config
from tdxvirt.errors import InputError
from tdxvirt.lifecycle import tds
from tdxvirt.lifecycle.fleet import Host, resolve
from tdxvirt.sim.hostroot import build_host_root

NVIDIA = 0x10DE
H100_PEERS = ("0000:16:01.0", "0000:17:00.0")

pytestmark = pytest.mark.skipif(not available(),
                                reason="openssh-server and netcat-openbsd (scripts/setup installs them)")


def devices_a():
    return (
        pci_device("0000:17:00.0", NVIDIA, 0x2330, 0x030200, 7, members=H100_PEERS, numa=1,
                   product_name="GH100 [H100 SXM5 80GB]"),
        pci_device("0000:16:01.0", 0x8086, 0x352A, 0x060400, 7, members=H100_PEERS, numa=1),
        pci_device("0000:b8:00.0", NVIDIA, 0x2330, 0x030200, 9, numa=0,
                   product_name="GH100 [H100 SXM5 80GB]"),
    )


def devices_b():
    return tuple(pci_device(address, NVIDIA, 0x233B, 0x030200, group, numa=numa,
                            product_name="GH100 [H200 NVL]")
                 for address, group, numa in (("0000:1a:00.0", 3, 0), ("0000:4c:00.0", 12, 0),
                                              ("0000:cb:00.0", 31, 1)))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, sim):
    """{'gpu-a': RemoteHost, 'gpu-b': ..., plus 'tdx' and 'notdx' URIs} and a config
    file naming them all in [hosts]."""
    work = tmp_path_factory.mktemp("fleet")
    tag = uuid.uuid4().hex[:8]
    a = remote_host(work / "a", sim.chroot, sim.socket, f"tdxvirt-fleet-a-{tag}", devices_a(),
                    [("td-a", ["b8:00.0"], {})])
    b = remote_host(work / "b", sim.chroot, sim.socket, f"tdxvirt-fleet-b-{tag}", devices_b(),
                    [("td-b", ["1a:00.0"], {"mmio_window": "256G"})])
    # TDX unknown and no GPU (the emulated host "tdx" has its H100 as a node device)
    bare = remote_host(work / "bare", sim.chroot, sim.socket, f"tdxvirt-fleet-bare-{tag}", ())
    qemu_sshd = Sshd(work)
    uris = {"gpu-a": a.uri, "gpu-b": b.uri, "nogpu": bare.uri,
            "tdx": qemu_sshd.uri("qemu", "/system", sim.socket),
            "notdx": qemu_sshd.uri("qemu", "/system", sim.legacy_socket),
            "dead": qemu_sshd.uri("test", "/nonexistent/node.xml", work / "no-daemon.sock")}
    config = work / "config.toml"
    config.write_text("[hosts]\n" + "".join(f'{name} = "{uri}"\n' for name, uri in uris.items()))
    yield {"a": a, "b": b, "uris": uris, "config": str(config), "work": work, "sim": sim}
    qemu_sshd.stop()
    for host in (a, b, bare):
        host.stop()


@pytest.fixture
def cli(fleet, monkeypatch, tmp_path):
    """tdxvirt in-process with the fleet's config file, a GPU-less host root and every
    local read a failure."""
    empty = build_host_root(tmp_path / "no-gpu", devices=())
    forbid_local_reads(monkeypatch, empty.base)
    monkeypatch.setenv("TDXVIRT_CONFIG", fleet["config"])

    def invoke(*args):
        result = CliRunner().invoke(main, ["--host-root", str(empty.base), *args])
        assert result.exception is None or isinstance(result.exception, SystemExit), \
            repr(result.exception)
        assert "Traceback" not in result.output
        return result

    return invoke


def table(text: str) -> list[list[str]]:
    """The rows of a table (after its header and rule), split on runs of spaces."""
    import re

    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()[2:] if line.strip()]


# ---------------------------------------------------------------- list


def test_list_asks_every_host_and_shows_each_tds_host_first(cli):
    result = cli("-c", "gpu-a", "-c", "gpu-b", "list")
    assert result.exit_code == 0, result.output
    header = result.stdout.splitlines()[0].split()
    assert header[:3] == ["HOST", "NAME", "STATE"]
    rows = table(result.stdout)
    assert [(r[0], r[1], r[-2]) for r in rows] == [("gpu-a", "td-a", "0000:b8:00.0"),
                                                   ("gpu-b", "td-b", "0000:1a:00.0")]
    reverse = table(cli("-c", "gpu-b", "-c", "gpu-a", "list").stdout)
    assert [r[0] for r in reverse] == ["gpu-b", "gpu-a"]  # the order the hosts were given


def test_list_json_gives_each_record_its_host(cli, fleet, tmp_path, monkeypatch):
    """--fleet: every host of [hosts], in the file's order."""
    config = tmp_path / "config.toml"
    config.write_text(f'[hosts]\ngpu-a = "{fleet["uris"]["gpu-a"]}"\n'
                      f'gpu-b = "{fleet["uris"]["gpu-b"]}"\n')
    monkeypatch.setenv("TDXVIRT_CONFIG", str(config))
    result = cli("--fleet", "list", "--json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [(r["host"], r["uri"], r["name"], r["gpus"]) for r in records] == [
        ("gpu-a", fleet["uris"]["gpu-a"], "td-a", ["0000:b8:00.0"]),
        ("gpu-b", fleet["uris"]["gpu-b"], "td-b", ["0000:1a:00.0"])]


def test_one_host_keeps_todays_output(cli, fleet):
    """One -c (by URI or by [hosts] name): no HOST column, no host key."""
    for connect in (fleet["uris"]["gpu-a"], "gpu-a"):
        result = cli("-c", connect, "list")
        assert result.stdout.splitlines()[0].split()[:2] == ["NAME", "STATE"]
        records = json.loads(cli("-c", connect, "list", "--json").stdout)
        assert [sorted(r) for r in records] == [sorted(
            ["name", "state", "type", "tdx", "dialect", "managed_by_tdxvirt", "vcpus", "memory_mib",
             "gpus", "uptime_s", "problems", "weakened"])]


def test_an_unreachable_host_is_one_line_and_the_others_answer(cli):
    result = cli("-c", "gpu-a", "-c", "dead", "-c", "gpu-b", "list")
    line = one_line_error(result, 1)
    assert line.startswith("tdxvirt: error: host dead: cannot connect to libvirt at ")
    assert [(r[0], r[1]) for r in table(result.stdout)] == [("gpu-a", "td-a"), ("gpu-b", "td-b")]


def test_a_host_lost_mid_list_is_one_line_and_the_others_answer(cli, fleet, tmp_path, monkeypatch):
    """Host C's sshd and its every session are killed after C listed its domains and
    before their XML is read: libvirt's client sees its transport close mid-list."""
    doomed = remote_host(tmp_path / "c", fleet["sim"].chroot, fleet["sim"].socket,
                         f"tdxvirt-fleet-c-{uuid.uuid4().hex[:8]}", devices_b(),
                         [("td-c", ["4c:00.0"], {"mmio_window": "256G"})])
    listing = tds.xmls_of_listed

    def cut_midway(domains):
        if domains and doomed.node.path in domains[0].connect().getURI():
            cut(doomed.sshd)
        return listing(domains)

    monkeypatch.setattr("tdxvirt.lifecycle.tds.xmls_of_listed", cut_midway)
    try:
        result = cli("-c", "gpu-a", "-c", doomed.uri, "-c", "gpu-b", "list", "--json")
    finally:
        doomed.stop()
    line = one_line_error(result, 1)
    assert line.startswith("tdxvirt: error: host ") and "lost the libvirt connection" in line
    assert doomed.node.path in line  # the host by its URI: it had no [hosts] name
    records = json.loads(result.stdout)
    assert [(r["host"], r["name"]) for r in records[:-1]] == [("gpu-a", "td-a"), ("gpu-b", "td-b")]
    lost = records[-1]  # JSON alone tells the lost host from one without TDs
    assert sorted(lost) == ["error", "host", "uri"] and lost["uri"] == doomed.uri
    assert "lost the libvirt connection" in lost["error"]


def test_the_command_itself_over_the_fleet(fleet, tmp_path):
    """The installed command, as users run it, in a process of its own (real threads,
    real ssh clients): one line for the host with nothing listening, exit 1."""
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(sys.executable), "tdxvirt")
    empty = build_host_root(tmp_path / "no-gpu", devices=())
    done = subprocess.run([script, "--host-root", str(empty.base), "-c", "gpu-b", "-c", "dead",
                           "-c", "gpu-a", "gpu", "list", "--json"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "TDXVIRT_CONFIG": fleet["config"]})
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("tdxvirt: error: host dead: ")
    records = json.loads(done.stdout)
    assert [(g["host"], g["address"]) for g in records[:-1]][::2] == [
        ("gpu-b", "0000:1a:00.0"), ("gpu-b", "0000:cb:00.0"), ("gpu-a", "0000:b8:00.0")]
    assert records[-1]["host"] == "dead" and records[-1]["error"].startswith("cannot connect")


def test_list_of_a_local_and_a_remote_host(cli, sim_uri):
    """A URI naming no host is labelled by the URI itself; its TDs are libvirt's there."""
    result = cli("-c", sim_uri, "-c", "gpu-b", "list", "--json")
    assert result.exit_code == 0, result.output
    hosts = {r["host"] for r in json.loads(result.stdout)}
    assert "gpu-b" in hosts and hosts <= {"gpu-b", sim_uri}


# ---------------------------------------------------------------- gpu list, host check


def test_gpu_list_shows_each_hosts_own_gpus(cli):
    records = json.loads(cli("-c", "gpu-b", "-c", "gpu-a", "gpu", "list", "--json").stdout)
    assert [(g["host"], g["address"], g["model"], g["td"]) for g in records] == [
        ("gpu-b", "0000:1a:00.0", "H200", "td-b"), ("gpu-b", "0000:4c:00.0", "H200", None),
        ("gpu-b", "0000:cb:00.0", "H200", None),
        ("gpu-a", "0000:17:00.0", "H100 SXM5 80GB", None),
        ("gpu-a", "0000:b8:00.0", "H100 SXM5 80GB", "td-a")]
    assert [g["numa_node"] for g in records] == [0, 0, 1, 1, 0]  # each host's node devices
    text = cli("-c", "gpu-a", "-c", "dead", "-c", "gpu-b", "gpu", "list")
    assert one_line_error(text, 1).startswith("tdxvirt: error: host dead: ")
    rows = table(text.stdout)
    assert text.stdout.splitlines()[0].split()[:2] == ["HOST", "DEVICE"]
    assert [(r[0], r[1]) for r in rows] == [("gpu-a", "0000:17:00.0"), ("gpu-a", "0000:b8:00.0"),
                                            ("gpu-b", "0000:1a:00.0"), ("gpu-b", "0000:4c:00.0"),
                                            ("gpu-b", "0000:cb:00.0")]


def test_gpu_list_modes_is_refused_before_any_host_is_asked(cli):
    line = one_line_error(cli("-c", "gpu-a", "-c", "gpu-b", "gpu", "list", "--modes"), 2)
    assert "read CC / PPCIe modes there" in line


def test_host_check_checks_each_hosts_own_gpus(cli, fleet):
    result = cli("-c", "gpu-a", "-c", "gpu-b", "-c", "dead", "host", "check", "--json")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith("tdxvirt: error: host dead: cannot connect")
    reports = json.loads(result.stdout)
    assert [(r["host"], r["uri"]) for r in reports] == [("gpu-a", fleet["uris"]["gpu-a"]),
                                                        ("gpu-b", fleet["uris"]["gpu-b"]),
                                                        ("dead", fleet["uris"]["dead"])]
    assert reports[-1]["error"].startswith("cannot connect to libvirt at ")
    reports = reports[:-1]
    gpus = [{c["name"].split(":")[0] + ":" + c["name"].split(":")[1] + ":" +
             c["name"].split(":")[2].split(" ")[0]
             for c in r["checks"] if c["name"].startswith("gpu 0000")} for r in reports]
    assert gpus == [{"gpu 0000:17:00.0", "gpu 0000:b8:00.0"},
                    {"gpu 0000:1a:00.0", "gpu 0000:4c:00.0", "gpu 0000:cb:00.0"}]
    text = cli("-c", "gpu-a", "-c", "gpu-b", "host", "check").stdout
    assert text.splitlines()[0].split()[:2] == ["HOST", "CHECK"]
    assert "gpu-a: " in text and "gpu-b: " in text  # each host's counts


# ---------------------------------------------------------------- define --gpu any / --gpus N


def test_define_gpu_any_picks_the_first_host_with_a_free_gpu(cli, fleet):
    """gpu-a's 0000:b8:00.0 is held by td-a: its 0000:17:00.0 is picked; the TD is
    defined there (libvirt on that host validated it) with that host's facts."""
    result = cli("-c", "notdx", "-c", "nogpu", "-c", "gpu-a", "-c", "gpu-b", "define", "picked",
                 "--gpu", "any")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Picked GPU 0000:17:00.0 on gpu-a: TDX support unknown")
    assert "not held by any domain there" in lines[0] and "CC mode unknown from here" in lines[0]
    assert lines[1].startswith("  passed over notdx: libvirt at ") and "no TDX support" in lines[1]
    assert lines[2].startswith("  passed over nogpu: no NVIDIA GPU on host 127.0.0.1")
    assert lines[3].startswith("  passed over gpu-b: ")
    assert lines[4] == f"Defined TD 'picked' at {fleet['uris']['gpu-a']} (native dialect)"
    assert "GPU 0000:17:00.0: managed hostdev" in result.stdout


def test_define_gpus_n_passes_over_hosts_without_enough(cli, fleet):
    """gpu-a has one free GPU; gpu-b two, whose BAR sizes tdxvirt does not know: no
    host qualifies without --mmio-window (one line, each host's reason); with it, gpu-b."""
    line = one_line_error(cli("-c", "gpu-a", "-c", "gpu-b", "-c", "dead", "define", "two",
                              "--gpus", "2"), 1)
    assert line.startswith("tdxvirt: error: no host can take this TD (gpu-a: 1 free GPU of 2, "
                           "2 wanted; 0000:b8:00.0 held by 'td-a' | gpu-b: 0 free GPUs of 3")
    assert "0000:4c:00.0, 0000:cb:00.0 BAR sizes unknown to tdxvirt" in line
    assert "| dead: cannot connect to libvirt at " in line
    result = cli("-c", "gpu-a", "-c", "gpu-b", "define", "two", "--gpus", "2",
                 "--mmio-window", "512G", "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Picked GPUs 0000:4c:00.0, 0000:cb:00.0 on gpu-b: ")
    assert "  passed over gpu-a: 1 free GPU of 2, 2 wanted" in result.stdout
    assert "bus='0x4c'" in result.stdout and "bus='0xcb'" in result.stdout
    assert result.stdout.rstrip().endswith("(dry run: nothing was changed)")
    assert f"would define 'two' at {fleet['uris']['gpu-b']}" in result.stdout


def test_define_gpu_any_on_one_host_and_print_xml_keeps_stdout_xml(cli):
    result = cli("-c", "gpu-b", "define", "one", "--gpu", "any", "--mmio-window", "256G",
                 "--print-xml")
    assert result.exit_code == 0, result.output
    assert result.stdout.lstrip().startswith("<domain")  # the choice is on stderr: XML stays pipeable
    assert result.stderr.startswith("Picked GPU 0000:4c:00.0 on gpu-b: ")


@pytest.mark.parametrize("args, message", [
    (("--gpu", "any", "--allow-shared"), "name the shared GPU with --gpu BDF instead"),
    (("--gpus", "2", "--allow-shared"), "name the shared GPU with --gpu BDF instead"),
    (("--gpu", "any", "--gpu", "17:00.0"), "take no other --gpu"),
    (("--gpu", "any", "--gpus", "2"), "take no other --gpu"),
    (("--gpus", "2", "--ppcie"), "--ppcie passes a whole HGX board"),
])
def test_define_pick_options_that_contradict(cli, args, message):
    assert message in one_line_error(cli("-c", "gpu-a", "-c", "gpu-b", "define", "x", *args), 2)


# ---------------------------------------------------------------- one-host commands


@pytest.mark.parametrize("args", [("start", "td-a"), ("stop", "td-a"), ("undefine", "td-a"),
                                  ("define", "x", "--gpu", "17:00.0"), ("show", "td-a"),
                                  ("gpu", "detach", "17:00.0", "--dry-run")])
def test_commands_on_one_host_refuse_several(cli, args):
    line = one_line_error(cli("-c", "gpu-a", "-c", "gpu-b", *args), 2)
    assert "this command acts on one host, and 2 were given (gpu-a, gpu-b); pass one -c" in line


@pytest.mark.parametrize("name, gpu, extra, other", [
    ("gpu-a", "17:00.0", (), "0000:4c:00.0"),
    ("gpu-b", "cb:00.0", ("--mmio-window", "256G"), "0000:17:00.0"),
])
def test_each_host_by_its_name(cli, name, gpu, extra, other):
    """Every command against each host named from [hosts]: that host's facts, nothing
    of this machine read (define, start, gpu list, gpu detach --dry-run, host check,
    undefine --remove-storage)."""
    defined = cli("-c", name, "define", f"td-{name}", "--gpu", gpu, *extra)
    assert defined.exit_code == 0, defined.output
    assert f"GPU 0000:{gpu}: managed hostdev" in defined.stdout
    missing = one_line_error(cli("-c", name, "define", "y", "--gpu", other, *extra), 2)
    assert f"no PCI device {other} on host 127.0.0.1" in missing
    td = "td-a" if name == "gpu-a" else "td-b"
    assert cli("-c", name, "start", td).stdout.strip() == f"Started '{td}'"
    listed = json.loads(cli("-c", name, "gpu", "list", "--json").stdout)
    assert [g["td"] for g in listed if g["td"]] == [td]
    refused = one_line_error(cli("-c", name, "gpu", "detach", gpu, "--dry-run"), 2)
    assert "names another host; run it on that host" in refused
    checks = json.loads(cli("-c", name, "host", "check", "--json").stdout)["checks"]
    assert any(c["name"].startswith(f"gpu 0000:{gpu}") for c in checks)
    undefined = cli("-c", name, "undefine", td, "--remove-storage")
    assert undefined.exit_code == 0 and undefined.stdout.startswith(f"Undefined '{td}' (UUID ")
    assert "removed" not in undefined.stdout  # nothing of that host's storage, nothing here


# ---------------------------------------------------------------- which hosts


def test_hosts_come_from_c_and_the_config_file():
    config = Config(hosts=(("gpu-a", "qemu+ssh://root@a.example/system"),
                           ("gpu-b", "qemu+ssh://root@b.example:2222/system")))
    named = resolve(["gpu-b", "qemu+tls://c.example/system", "gpu-b"], False, lambda: config)
    assert named == [Host("gpu-b", "qemu+ssh://root@b.example:2222/system"),
                     Host("c.example", "qemu+tls://c.example/system")]  # gpu-b asked once
    assert [h.label for h in resolve([], True, lambda: config)] == ["gpu-a", "gpu-b"]
    # two URIs of one host keep apart by their whole URI; a libvirt alias passes through
    same = resolve(["qemu+ssh://h/system", "test+ssh://h/x", "myalias"], False, lambda: Config())
    assert [h.label for h in same] == ["qemu+ssh://h/system", "test+ssh://h/x", "myalias"]
    assert resolve(["qemu:///system"], False, lambda: pytest.fail("read the config")) == [
        Host("qemu:///system", "qemu:///system")]  # URIs alone never read the config file
    with pytest.raises(InputError, match="give one or the other"):
        resolve(["gpu-a"], True, lambda: config)
    with pytest.raises(InputError, match="no \\[hosts\\] table"):
        resolve([], True, lambda: Config())


@pytest.mark.parametrize("text, message", [
    ('[hosts]\n"bad name" = "qemu:///system"\n', "host name 'bad name'"),
    ('[hosts]\na = "gpu-a"\n', "must be a libvirt URI"),
    ('[hosts]\na = 1\n', "must be a libvirt URI"),
    ('hosts = "x"\n', "'hosts' must be a table"),
])
def test_bad_hosts_table_is_one_line(tmp_path, monkeypatch, text, message):
    path = tmp_path / "config.toml"
    path.write_text(text)
    monkeypatch.setenv("TDXVIRT_CONFIG", str(path))
    result = CliRunner().invoke(main, ["--fleet", "list"])
    assert message in one_line_error(result, 2)


def test_fleet_and_c_together_is_one_line(cli):
    assert "give one or the other" in one_line_error(cli("--fleet", "-c", "gpu-a", "list"), 2)


# ---------------------------------------------------------------- this machine's GPUs: CC modes read


def test_offer_reads_cc_modes_of_this_machines_gpus(conn, sim_uri, tmp_path, monkeypatch):
    """A local host: GPUs from a fake host root (real H100 sysfs values), CC modes read
    through NVIDIA's tool's stand-in, holders from the real test driver."""
    from gpu_fakes import STANDIN, StandinTool, build, h100

    from tdxvirt.facts.local import LocalFacts
    from tdxvirt.gpu.modes import mode_reader
    from tdxvirt.lifecycle.fleet import offer

    domain = f"{uuid.uuid4().int % 0xEFFF + 0x1000:04x}"
    off, on, bound = f"{domain}:38:00.0", f"{domain}:39:00.0", f"{domain}:3a:00.0"
    root = build(tmp_path / "root", [h100(off, group=1, driver="vfio-pci"),
                                     h100(on, group=2, driver="vfio-pci"),
                                     h100(bound, group=3, driver="nvidia")])
    tool = StandinTool(root, tmp_path)
    for name, value in tool.env.items():
        monkeypatch.setenv(name, value)
    tool.set_state(**{off: {"cc": "off"}, on: {"cc": "on"}, bound: {"cc": "devtools"}})
    facts = LocalFacts(root, sim_uri, conn)
    read = mode_reader(root, str(STANDIN))
    assert read is not None, "the tests run as root"

    td = offer(facts, conn, 1, read_modes=read)
    assert td.gpus == [on] and "CC mode on (or devtools) where read" in td.why
    assert td.free == [on, bound]  # devtools is accepted, as start's preflight accepts it
    assert td.why.startswith("TDX on") or td.why.startswith("TDX support unknown")
    plain = offer(facts, conn, 1, tdx=False, read_modes=read)
    assert plain.gpus == [off]  # a plain VM needs CC off
    unmanaged = offer(facts, conn, 2, managed=False, read_modes=read)
    assert unmanaged.gpus == []
    assert unmanaged.why.startswith("1 free GPU of 3, 2 wanted")
    assert f"{bound} not on vfio-pci (--no-managed)" in unmanaged.why
    assert f"{off} CC mode off, on needed" in unmanaged.why
    assert "`tdxvirt gpu cc-mode BDF --set on` on that host" in unmanaged.remedies
    assert any("tdxvirt gpu detach BDF" in r for r in unmanaged.remedies)
    assert not any("free a GPU" in r for r in unmanaged.remedies)  # nothing is held
    unknown = offer(facts, conn, 3, read_modes=None)
    assert unknown.gpus == [off, on, bound] and "CC mode unknown (NVIDIA's tool" in unknown.why


# ---------------------------------------------------------------- review findings (fixB)


def test_a_host_that_never_answers_is_one_line_after_its_deadline(cli, fleet):
    """A silent TCP listener (the kernel completes the handshake, nothing ever answers)
    as one host: the others' TDs are shown, that host is one line, within the deadline."""
    import socket
    import time

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    hung = f"qemu+tcp://127.0.0.1:{port}/system"
    try:
        began = time.monotonic()
        result = cli("--host-timeout", "1.5", "-c", "gpu-a", "-c", hung, "list")
        took = time.monotonic() - began
        as_json = cli("--host-timeout", "1", "-c", hung, "-c", "gpu-b", "list", "--json")
    finally:
        silent.close()  # the waiting threads' connections then end
    assert one_line_error(result, 1) == (
        f"tdxvirt: error: host 127.0.0.1:{port}: no answer within 1.5 s; check that the host "
        "is up and its libvirt answers (--host-timeout S waits longer)")
    assert [(r[0], r[1]) for r in table(result.stdout)] == [("gpu-a", "td-a")]
    assert took < 15, took
    records = json.loads(as_json.stdout)
    assert as_json.exit_code == 1
    assert [(r["host"], r.get("name"), r.get("error", "")[:21]) for r in records] == [
        ("gpu-b", "td-b", ""), (f"127.0.0.1:{port}", None, "no answer within 1 s;")]


def test_ssh_hosts_are_opened_without_a_terminal():
    """Hosts are asked at once: libvirt's no_tty=1 keeps ssh from prompting on one
    terminal (the fleet's ssh tests above connect that way, with their keys)."""
    from tdxvirt.lifecycle.fleet import with_no_tty

    assert Host("a", "qemu+ssh://root@a/system").connect_uri == \
        "qemu+ssh://root@a/system?no_tty=1"
    assert with_no_tty("qemu+ssh://a:2222/system?keyfile=/k&no_verify=1") == \
        "qemu+ssh://a:2222/system?keyfile=%2Fk&no_verify=1&no_tty=1"
    for unchanged in ("qemu+ssh://a/system?no_tty=0", "qemu+libssh2://a/system",
                      "qemu+tls://a/system", "qemu:///system", "myalias"):
        assert with_no_tty(unchanged) == unchanged


def test_one_host_given_twice_is_asked_once_under_its_normalised_uri():
    named = resolve(["qemu+ssh://x/system", "QEMU+ssh://root@X:22/system/",
                     "qemu+ssh://x/session", "qemu+ssh://bob@x/session",
                     "qemu+tls://x:16514/system", "qemu+tls://x/system?b=2&a=1",
                     "qemu+tls://x/system?a=1&b=2&no_tty=1", "qemu+ssh://x:2222/system"],
                    False, lambda: Config())
    assert [h.uri for h in named] == ["qemu+ssh://x/system", "qemu+ssh://x/session",
                                      "qemu+ssh://bob@x/session", "qemu+tls://x:16514/system",
                                      "qemu+tls://x/system?b=2&a=1", "qemu+ssh://x:2222/system"]


def test_a_fleet_keeps_its_shape_when_its_names_are_one_host(cli, fleet):
    """-c twice is a fleet, even when both name one host: JSON then always carries the
    host, so scripts read one shape."""
    result = cli("-c", "gpu-a", "-c", fleet["uris"]["gpu-a"], "list", "--json")
    assert result.exit_code == 0, result.output
    assert [(r["host"], r["uri"], r["name"]) for r in json.loads(result.stdout)] == [
        ("gpu-a", fleet["uris"]["gpu-a"], "td-a")]
    text = cli("-c", "gpu-a", "-c", "gpu-a", "gpu", "list").stdout
    assert text.splitlines()[0].split()[:2] == ["HOST", "DEVICE"]


def test_host_check_counts_the_failed_checks_of_each_host(cli, fleet):
    """Each host is checked for GPUs it lacks: gpu-a lacks two, gpu-b one."""
    result = cli("-c", "gpu-a", "-c", "gpu-b", "host", "check", "--json", "--for-gpu", "17:00.0",
                 "--for-gpu", "4c:00.0", "--for-gpu", "cb:00.0")
    reports = json.loads(result.stdout)
    assert not any("error" in r for r in reports), (reports, result.stderr)
    failing = {r["host"]: sum(c["status"] == "fail" for c in r["checks"]) for r in reports}
    assert failing == {"gpu-a": 2, "gpu-b": 1}, reports
    assert result.exit_code == 1
    expected = [f"tdxvirt: host {host}: {count} check(s) failed"
                for host, count in failing.items() if count]
    assert result.stderr.splitlines() == expected
    assert "True" not in result.stderr


def test_no_host_qualifies_names_the_remedy_of_each_reason(cli):
    line = one_line_error(cli("-c", "notdx", "-c", "nogpu", "-c", "gpu-a", "-c", "gpu-b",
                              "-c", "dead", "define", "many", "--gpus", "2"), 1)
    remedies = line.split("); to fix: ", 1)[1]
    assert remedies.split("; or ") == [
        "enable TDX on host 127.0.0.1 (`tdxvirt host check` there names what is missing; "
        "`tdxvirt host setup` sets it up)",
        "add a host with a free GPU (-c, or [hosts] with --fleet)",
        "free a GPU (`tdxvirt gpu list` shows which domain holds each; `tdxvirt undefine` one)",
        "give --mmio-window SIZE (e.g. 256G)",
        "make dead reachable, or leave it out"]


def test_a_host_whose_tdx_is_known_on_is_preferred():
    from tdxvirt.lifecycle.fleet import Answer, Offer, choose

    unknown = Answer(Host("first", "test+ssh://h1/x"), Offer(["0000:17:00.0"], tdx_known=False))
    known = Answer(Host("second", "qemu+ssh://h2/system"), Offer(["0000:38:00.0"],
                                                                  tdx_known=True))
    later = Answer(Host("third", "qemu+ssh://h3/system"), Offer(["0000:38:00.0"], tdx_known=True))
    assert [a.host.label for a in choose([unknown, known, later])] == ["second", "third", "first"]


def test_no_libvirt_warning_is_escaped(tmp_path):
    """gpu list on a local URI whose libvirt cannot be reached warns with libvirt's
    words, which quote the URI: an ESC in it is shown escaped, never sent."""
    root = build_host_root(tmp_path / "root")
    result = CliRunner().invoke(main, ["--host-root", str(root.base), "-c",
                                       "test+unix:///default?socket=/nonexistent/\x1b[2Jsock",
                                       "gpu", "list"])
    assert result.exit_code == 0, result.output
    warning = result.stderr.splitlines()[0]
    assert warning.startswith("tdxvirt: warning: no libvirt facts or TDs: cannot connect")
    assert "\x1b" not in result.stderr and "\\x1b[2J" in warning


def test_gpu_list_modes_on_several_local_uris_is_refused(cli, sim_uri, fleet):
    line = one_line_error(cli("-c", sim_uri, "-c", fleet["sim"].qemu_uri, "gpu", "list",
                              "--modes"), 2)
    assert "would run on the same GPUs at once; give one -c with --modes" in line


# ---------------------------------------------------------------- parallel picks


@pytest.fixture
def two_free_gpus(tmp_path, conn):
    """A fake host root with two free H100s on vfio-pci at a PCI domain of this test's
    own (the test driver's state is shared), and the names of the TDs to remove after."""
    from gpu_fakes import build, h100

    domain = f"{uuid.uuid4().int % 0xEFFF + 0x1000:04x}"
    gpus = [f"{domain}:38:00.0", f"{domain}:39:00.0"]
    root = build(tmp_path / "root", [h100(gpus[0], group=1, driver="vfio-pci"),
                                     h100(gpus[1], group=2, driver="vfio-pci")])
    names = [f"pick-{uuid.uuid4().hex[:8]}-{n}" for n in range(3)]
    yield root, gpus, names
    for name in names:
        try:
            conn.lookupByName(name).undefine()
        except Exception:  # not defined (the loser)
            pass


def test_a_pick_passes_over_a_gpu_another_tdxvirt_is_picking(two_free_gpus, sim_uri, conn):
    """Another tdxvirt holds the first GPU's pick lock: this define moves on to the
    second; with both held it defines nothing and says so in one line."""
    from tdxvirt import locks
    from tdxvirt.lifecycle.fleet import pick_keys

    root, gpus, names = two_free_gpus

    def define(name):
        return CliRunner().invoke(main, ["--host-root", str(root.base), "-c", sim_uri,
                                         "define", name, "--gpu", "any"])

    with locks.held(pick_keys("localhost", gpus[:1])):
        result = define(names[0])
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith(f"Picked GPU {gpus[1]} on ")
        with locks.held(pick_keys("localhost", gpus[1:])):
            refused = one_line_error(define(names[1]), 1)
    assert refused.startswith("tdxvirt: error: no host can take this TD: the free GPUs of ")
    assert names[1] not in [d.name() for d in conn.listAllDomains(0)]


def test_a_gpu_defined_since_the_offer_is_not_claimed(two_free_gpus, sim_uri, conn):
    """Holders are read again under the pick lock: a GPU a domain took after the offer
    was read is passed over for the next."""
    from tdxvirt.cli import main as _  # noqa: F401  (the CLI's imports, as a run has them)
    from tdxvirt.domain.spec import TDSpec
    from tdxvirt.lifecycle.fleet import claimed

    root, gpus, names = two_free_gpus
    tds.define_td(conn, root, TDSpec.from_user(name=names[2], gpus=[gpus[0]]))
    with claimed(conn, "localhost", gpus, 1) as mine:
        assert mine == [gpus[1]]
    with claimed(conn, "localhost", gpus[:1], 1) as none:
        assert none is None


def test_parallel_picks_never_give_one_gpu_twice(two_free_gpus, sim_uri, conn):
    """Three `define --gpu any` processes at once for two free GPUs: two TDs on two
    different GPUs, the third one line (exit 1), nothing of it defined."""
    import os
    import subprocess
    import sys

    root, gpus, names = two_free_gpus
    script = os.path.join(os.path.dirname(sys.executable), "tdxvirt")
    runs = [subprocess.Popen([script, "--host-root", str(root.base), "-c", sim_uri, "define",
                              name, "--gpu", "any"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for name in names]
    outcomes = [(run.wait(timeout=120), *run.communicate()) for run in runs]
    assert sorted(code for code, _, _ in outcomes) == [0, 0, 1], outcomes
    loser = next(err for code, _, err in outcomes if code == 1)
    assert len(loser.splitlines()) == 1 and loser.startswith(
        "tdxvirt: error: no host can take this TD"), loser
    from tdxvirt.lifecycle.tds import read_facts

    given = sorted(g for d in conn.listAllDomains(0) if d.name() in names
                   for g in read_facts(d.XMLDesc(0)).gpus)
    assert given == gpus


def test_a_host_whose_xml_tdxvirt_cannot_read_is_that_hosts_one_line():
    """A hostile or broken host answers with XML the parsers refuse (<vcpu>four</vcpu>,
    <numa node='zero'/>): its answer is one line, every other host's stands."""
    from lxml import etree

    from tdxvirt.domain.domainxml import read_domain_xml
    from tdxvirt.facts.libvirt import parse_nodedev_xml
    from tdxvirt.lifecycle.fleet import ask_each

    assert read_domain_xml("<domain><name>x</name><vcpu>four</vcpu>"
                           "<memory>lots</memory></domain>").vcpus == 0
    hosts = [Host("good", "qemu+ssh://good/system"), Host("bad", "qemu+ssh://bad/system"),
             Host("broken", "qemu+ssh://broken/system")]

    def question(host):
        if host.label == "bad":
            return parse_nodedev_xml("<device><capability type='pci'><numa node='zero'/>"
                                     "</capability></device>")
        if host.label == "broken":
            return etree.fromstring(b"<domain><name>\x1b[31m</domain>")
        return "fine"

    good, bad, broken = ask_each(hosts, lambda host: host, question)
    assert good.value == "fine" and good.error is None
    for answer in (bad, broken):
        assert answer.error.startswith(f"{answer.host.uri} answered with XML tdxvirt cannot read")
        assert "\n" not in answer.error and "\x1b" not in answer.error
