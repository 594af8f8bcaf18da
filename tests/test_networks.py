"""A TD's NIC (`define --network`, virt-install's words) on the emulated TDX host's real
network driver: libvirt's 'default' network (Debian's, virbr0 with DHCP, in the emulated
host's own network namespace), a network libvirt lacks or has stopped, a bridge, an ssh
key for a TD nobody could reach; `host check` and the preflight saying what is missing."""

from __future__ import annotations

import subprocess
import uuid

import pytest
from conftest import run_sim
from lxml import etree

from tdxvirt.domain.spec import TDSpec, parse_network
from tdxvirt.errors import InputError
from tdxvirt.lifecycle import tds
from tdxvirt.virt.conn import open_connection
from tdxvirt.virt.networks import network_state

pytestmark = pytest.mark.usefixtures("cc_on")


@pytest.mark.parametrize("given, stored", [
    ("default", "network=default"), ("none", "none"), ("user", "user"), ("auto", "auto"),
    ("network=lab-net.1", "network=lab-net.1"), ("bridge=br0", "bridge=br0"),
    (" bridge=virbr0 ", "bridge=virbr0")])
def test_network_words_as_virt_install_spells_them(given, stored):
    assert parse_network(given) == stored


@pytest.mark.parametrize("given, said", [
    ("nat", "give none, default, user"), ("bridge=", "is not a bridge name"),
    ("bridge=a-bridge-name-too-long", "at most 15"), ("bridge=br0;reboot", "is not a bridge"),
    ("network=../x", "is not a libvirt network name"), ("network=", "is not a libvirt")])
def test_bad_network_words_are_one_line_refusals(given, said):
    with pytest.raises(InputError, match=said):
        parse_network(given)


def _interfaces(conn, name):
    root = etree.fromstring(conn.lookupByName(name).XMLDesc(0).encode())
    return [(i.get("type"), i.find("source").attrib if i.find("source") is not None else {})
            for i in root.findall("devices/interface")]


@pytest.fixture
def name(qemu_conn):
    name = f"net-{uuid.uuid4().hex[:8]}"
    yield name
    run_sim("destroy", name)
    run_sim("undefine", name, "--remove-storage")


def test_define_gives_the_default_network_as_virt_install_does_and_the_td_starts(qemu_conn, name):
    assert network_state(qemu_conn, "default") == "active"
    defined = run_sim("define", name, "--gpu", "38:00.0", "--allow-shared", "--memory", "1G",
                      "--vcpus", "1")
    assert defined.returncode == 0, defined.stderr
    assert _interfaces(qemu_conn, name) == [("network", {"network": "default"})]
    started = run_sim("start", name)
    assert started.returncode == 0, started.stderr
    listed = subprocess.run(["virsh", "-c", qemu_conn.getURI(), "domiflist", name],
                            capture_output=True, text=True, check=True).stdout
    assert "default" in listed and "virtio" in listed  # a tap on virbr0, as on a real host


def test_a_bridge_of_the_host_is_used_by_name(qemu_conn, name):
    defined = run_sim("define", name, "--gpu", "38:00.0", "--allow-shared", "--memory", "1G",
                      "--vcpus", "1", "--network", "bridge=virbr0")
    assert defined.returncode == 0, defined.stderr
    assert _interfaces(qemu_conn, name) == [("bridge", {"bridge": "virbr0"})]
    assert run_sim("start", name).returncode == 0


def test_a_network_libvirt_lacks_is_refused_and_nothing_is_defined(qemu_conn, name):
    result = run_sim("define", name, "--gpu", "38:00.0", "--allow-shared", "--network",
                     "network=no-such-net")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "has no network 'no-such-net'" in result.stderr
    assert "net-list --all" in result.stderr
    assert name not in qemu_conn.listDefinedDomains()


def test_a_stopped_network_is_a_warning_at_define_and_a_refusal_at_start(qemu_conn, name):
    network = f"tdx{uuid.uuid4().hex[:8]}"
    defined_net = qemu_conn.networkDefineXML(
        f"<network><name>{network}</name><forward mode='open'/><bridge name='{network[:12]}'/>"
        "</network>")  # open: this kernel lacks the tc action other modes add
    try:
        defined = run_sim("define", name, "--gpu", "38:00.0", "--allow-shared", "--memory",
                          "1G", "--vcpus", "1", "--network", f"network={network}")
        assert defined.returncode == 0, defined.stderr
        assert "`virsh -c " in defined.stderr and f" net-start {network}`" in defined.stderr
        started = run_sim("start", name)
        assert started.returncode != 0
        assert f"libvirt network '{network}' is not active" in started.stderr
        assert not qemu_conn.lookupByName(name).isActive()
        defined_net.create()
        assert run_sim("start", name).returncode == 0
    finally:
        run_sim("destroy", name)
        if defined_net.isActive():
            defined_net.destroy()
        defined_net.undefine()


def test_an_ssh_key_for_a_td_nobody_could_reach_is_refused(qemu_conn, name, tmp_path):
    key = tmp_path / "id.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBmVqXGxC5oXuDbG4e3nY6QZ1bG9fC8y8z8bHk2mKq8o t@x\n")
    result = run_sim("define", name, "--gpu", "38:00.0", "--allow-shared", "--network", "none",
                     "--ssh-key", str(key))
    assert result.returncode == 2 and "--network none gives it no NIC" in result.stderr
    assert name not in qemu_conn.listDefinedDomains()
    assert run_sim("define", name, "--gpu", "38:00.0", "--allow-shared", "--network", "none",
                   "--ssh-key", str(key), "--vsock", "--print-xml").returncode == 0


def test_a_host_without_a_default_network_gets_a_td_without_nic_and_says_so(sim, tmp_path,
                                                                           gpu_host):
    """The emulated host's libvirt 12.x test driver from a node file with no network (the
    daemon reads it at the same path: /tmp is shared): the default resolves to no NIC with
    a warning; an ssh key is then refused, nothing left behind."""
    node = tmp_path / "node.xml"
    node.write_text("<node><cpu><mode>host-passthrough</mode></cpu></node>")
    conn = open_connection(f"test+unix://{node}?socket={sim.socket}")
    host, gpu = gpu_host
    td = tds.define_td(conn, host, TDSpec.from_user(name="nonic", gpus=[gpu], network="auto"))
    assert "<interface" not in td.xml
    assert any("gets no NIC" in w and "has no libvirt network 'default'" in w
               for w in td.plan.warnings)
    with pytest.raises(InputError, match="has no network 'default' to give it a NIC"):
        tds.define_td(conn, host, TDSpec.from_user(
            name="nonic2", gpus=[gpu], network="auto", ssh_key=[str(_key(tmp_path))]))
    assert conn.listDefinedDomains() == ["nonic"]


def _key(tmp_path):
    key = tmp_path / "k.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBmVqXGxC5oXuDbG4e3nY6QZ1bG9fC8y8z8bHk2mKq8o t@x\n")
    return key


def test_host_check_names_the_default_network_and_passt():
    checked = run_sim("host", "check", "--json")
    import json

    rows = {row["name"]: row for row in json.loads(checked.stdout)["checks"]}
    assert rows["libvirt network 'default'"]["status"] == "ok"
    assert rows["passt (--network user)"]["status"] == "ok"


def test_sim_exec_runs_a_command_in_the_simulated_hosts_network():
    """The simulated host's virbr0 is not this machine's: only `sim exec` sees it, and
    the command's exit status is passed on."""
    from conftest import TDXVIRT

    inside = subprocess.run([TDXVIRT, "sim", "exec", "--", "ip", "-br", "addr", "show", "virbr0"],
                            capture_output=True, text=True, timeout=30)
    assert inside.returncode == 0 and "192.168.122.1/24" in inside.stdout
    outside = subprocess.run(["ip", "-br", "addr", "show", "virbr0"], capture_output=True, text=True)
    assert "192.168.122.1/24" not in outside.stdout
    status = subprocess.run([TDXVIRT, "sim", "exec", "--", "sh", "-c", "exit 3"], timeout=30)
    assert status.returncode == 3


def test_sim_up_brings_back_a_default_network_a_daemon_did_not_autostart(sim, qemu_conn):
    """New namespaces with /run kept (the daemons killed, not `sim down`) left libvirt's
    once-per-boot mark, so the network driver skipped the autostart and every TD with a
    NIC failed to start: `sim up` starts networks marked to autostart, as a boot does."""
    from tdxvirt.sim import control

    qemu_conn.networkLookupByName("default").destroy()
    try:
        assert control.up(sim) == []  # nothing else was down
        assert qemu_conn.networkLookupByName("default").isActive()
    finally:
        default = qemu_conn.networkLookupByName("default")
        if not default.isActive():
            default.create()
    inside = subprocess.run(["nsenter", "--target", str(_virtlogd(sim)), "--net", "--",
                             "ip", "-br", "addr", "show", "virbr0"],
                            capture_output=True, text=True, timeout=30)
    assert "192.168.122.1/24" in inside.stdout


def _virtlogd(sim):
    from tdxvirt.sim import chroot

    return chroot.alive_pid(sim.chroot / "run/virtlogd.pid")
