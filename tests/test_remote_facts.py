"""Issue #15: every fact of a TD comes from the host that runs it.

Two simulated remote hosts, each libvirt's test driver loaded with a node file of its
own, served by the simulated host's daemon and reached through a real sshd on
127.0.0.1 (``test+ssh://root@127.0.0.1:PORT/tmp/.../node.xml``):

- gpuhost-a: H100 SXM5s (10de:2330, BAR sizes in tdxvirt's table) at 0000:17:00.0
  (NUMA node 1, IOMMU group 7 with a PCIe port) and 0000:b8:00.0 (NUMA node 0, group 9);
  a storage pool with two volumes; and TDs defined there: td-a on 0000:b8:00.0, one
  whose GPU the host lacks, one with storage tdxvirt made.
- gpuhost-b: H200s (10de:233b, BAR sizes unknown to tdxvirt) at 0000:4c:00.0 and
  0000:cb:00.0 (NUMA nodes 0 and 1, IOMMU groups 12 and 31) and 0000:1a:00.0; TDs
  defined there: td-b on 0000:1a:00.0, one with storage tdxvirt made.

This machine's host root has no GPU at all, and every way this machine could be read
for a remote URI raises: the local facts (tdxvirt.facts.local) are never built, any
HostRoot read fails, NVIDIA's tool is never looked for, qemu-img never runs, no build
record and no firmware descriptor is read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from click.testing import CliRunner
from conftest import one_line_error
from lxml import etree
from remote_hosts import (
    NodeFile,
    Sshd,
    available,
    exploding_root,
    forbid_local_reads,
    pci_device,
    pool,
    refuse,
    volume,
)

from tdxvirt import locks
from tdxvirt.cli import main
from tdxvirt.domain.integrity import problems as integrity_problems
from tdxvirt.domain.spec import TDSpec
from tdxvirt.errors import DeviceBusyError, InputError
from tdxvirt.facts import facts_for
from tdxvirt.facts.libvirt import LibvirtFacts, parse_nodedev_xml
from tdxvirt.facts.local import LocalFacts
from tdxvirt.lifecycle import tds
from tdxvirt.lifecycle.preflight import start_problems
from tdxvirt.pci import PciAddress
from tdxvirt.sim.hostroot import build_host_root
from tdxvirt.units import GIB, MIB
from tdxvirt.virt.conn import host_of, open_connection

SCRIPT = os.path.join(os.path.dirname(sys.executable), "tdxvirt")
NVIDIA = 0x10DE
H100_BARS = [16 * MIB, 128 * GIB, 32 * MIB]
IMAGES = "/var/lib/libvirt/images"
TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"  # libvirt's test driver's own XML

pytestmark = pytest.mark.skipif(not available(),
                                reason="openssh-server and netcat-openbsd (scripts/setup installs them)")


# ---------------------------------------------------------------- this machine: never read


@pytest.fixture
def nothing_local(monkeypatch, tmp_path):
    """Make every local read fail (remote_hosts.forbid_local_reads, over a root with no
    GPU). Returns that root's directory."""
    empty = build_host_root(tmp_path / "no-gpu", devices=())
    forbid_local_reads(monkeypatch, empty.base)
    return empty.base


def cli(uri: str, root, *args):
    result = CliRunner().invoke(main, ["-c", uri, "--host-root", str(root), *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    return result


# ---------------------------------------------------------------- the two hosts


def host_a(daemon_root, name) -> NodeFile:
    return NodeFile(daemon_root, name, devices=(
        pci_device("0000:17:00.0", NVIDIA, 0x2330, 0x030200, 7,
                   members=("0000:16:01.0", "0000:17:00.0"), numa=1,
                   product_name="GH100 [H100 SXM5 80GB]"),
        pci_device("0000:16:01.0", 0x8086, 0x352A, 0x060400, 7,
                   members=("0000:16:01.0", "0000:17:00.0"), numa=1),
        pci_device("0000:b8:00.0", NVIDIA, 0x2330, 0x030200, 9, numa=0,
                   product_name="GH100 [H100 SXM5 80GB]"),
    ), pools=(pool("images", IMAGES, (
        volume("a-boot.qcow2", f"{IMAGES}/a-boot.qcow2", "qcow2"),
        volume("a-backed.qcow2", f"{IMAGES}/a-backed.qcow2", "qcow2",
               backing=f"{IMAGES}/a-base.qcow2"),
    )),))


def host_b(daemon_root, name) -> NodeFile:
    return NodeFile(daemon_root, name, devices=(
        pci_device("0000:4c:00.0", NVIDIA, 0x233B, 0x030200, 12, numa=0,
                   product_name="GH100 [H200 NVL]"),
        pci_device("0000:cb:00.0", NVIDIA, 0x233B, 0x030200, 31, numa=1,
                   product_name="GH100 [H200 NVL]"),
        pci_device("0000:1a:00.0", NVIDIA, 0x233B, 0x030200, 3, numa=0,
                   product_name="GH100 [H200 NVL]"),
    ))


def _domain_xml(xml: str, name: str, gpu_bus: str | None = None,
                overlay: str | None = None) -> str:
    """A TD's XML renamed, with its GPU moved to another bus, or without a GPU and
    with an overlay disk tdxvirt made."""
    root = etree.fromstring(xml.encode())
    root.find("name").text = name
    identity = str(uuid.uuid4())  # another TD tdxvirt defined: a UUID of its own
    root.find("uuid").text = identity
    td = root.find("metadata/{urn:tdxvirt:td:1}td")
    td.find("{urn:tdxvirt:td:1}uuid").text = identity
    if gpu_bus:
        td.find("{urn:tdxvirt:td:1}gpu").set("bdf", f"0000:{gpu_bus}:00.0")
        root.find("devices/hostdev/source/address").set("bus", f"0x{gpu_bus}")
    if overlay:
        td.remove(td.find("{urn:tdxvirt:td:1}gpu"))
        root.find("devices").remove(root.find("devices/hostdev"))
        element = etree.SubElement(td, "{urn:tdxvirt:td:1}overlay", base="/base.qcow2")
        element.text = overlay
        root.find("devices").append(etree.fromstring(
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file='{overlay}'/><target dev='vda' bus='virtio'/></disk>"))
    return shut_off(etree.tostring(root, encoding="unicode"))


def shut_off(xml: str) -> str:
    """A node file's domain starts running unless its test-driver run state says 5."""
    root = etree.fromstring(xml.encode())
    etree.SubElement(root, f"{{{TEST_NS}}}runstate", nsmap={"test": TEST_NS}).text = "5"
    return etree.tostring(root, encoding="unicode") + "\n"


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, sim):
    """{'a': uri, 'b': uri, 'qemu': uri} through the sshd, with each host's TDs."""
    sshd = Sshd(tmp_path_factory.mktemp("sshd"))
    tag = uuid.uuid4().hex[:8]
    a, b = host_a(sim.chroot, f"tdxvirt-gpuhost-a-{tag}"), host_b(sim.chroot, f"tdxvirt-gpuhost-b-{tag}")
    a.write()
    b.write()
    uris = {"a": sshd.uri("test", a.path, sim.socket), "b": sshd.uri("test", b.path, sim.socket),
            "qemu": sshd.uri("qemu", "/system", sim.socket)}
    # TDs made by tdxvirt from each host's own facts, then written into its file.
    made = {}
    for key, name, options in (("a", "td-a", {"gpus": ["b8:00.0"]}),
                               ("b", "td-b", {"gpus": ["1a:00.0"], "mmio_window": "256G"})):
        conn = open_connection(uris[key])
        try:
            made[key] = tds.assemble_td(conn, LibvirtFacts(conn, uris[key]), TDSpec.from_user(
                name=name, remote=True, **options)).xml
        finally:
            conn.close()
    a.domains = [shut_off(made["a"]), _domain_xml(made["a"], "td-gone", gpu_bus="99"),
                 _domain_xml(made["a"], "td-store", overlay=f"{IMAGES}/td-store.qcow2")]
    b.domains = [shut_off(made["b"]),
                 _domain_xml(made["b"], "td-store", overlay=f"{IMAGES}/td-store.qcow2")]
    a.write()
    b.write()
    yield uris
    sshd.stop()
    a.remove()
    b.remove()


# ---------------------------------------------------------------- define


def test_define_print_xml_takes_each_hosts_own_facts(hosts, nothing_local):
    """NUMA node, IOMMU group and window from that host's node devices; the firmware is
    libvirt's pick there; nothing of this machine (which has no GPU) is read."""
    a = cli(hosts["a"], nothing_local, "define", "ta", "--gpu", "17:00.0", "--numa", "auto",
            "--print-xml")
    assert a.exit_code == 0, a.output
    root = etree.fromstring(a.stdout.encode())
    assert root.find("devices/hostdev/source/address").get("bus") == "0x17"
    assert root.find("numatune/memory").get("nodeset") == "1"  # host A's node device says 1
    assert "name=opt/ovmf/X-PciMmio64Mb,string=262144" in a.stdout  # table: 128 GiB + 48 MiB
    assert root.find("os").get("firmware") == "efi" and root.find("os/loader") is None

    b = cli(hosts["b"], nothing_local, "define", "tb", "--gpu", "4c:00.0", "--gpu", "cb:00.0",
            "--numa", "auto", "--print-xml", "--mmio-window", "512G")
    assert b.exit_code == 0, b.output
    root = etree.fromstring(b.stdout.encode())
    assert [a.get("bus") for a in root.iterfind("devices/hostdev/source/address")] == ["0x4c", "0xcb"]
    assert root.find("numatune/memory").get("nodeset") == "0-1"
    assert "name=opt/ovmf/X-PciMmio64Mb,string=524288" in b.stdout

    # Each host has only its own GPUs.
    line = one_line_error(cli(hosts["b"], nothing_local, "define", "tb", "--gpu", "17:00.0"), 2)
    assert "no PCI device 0000:17:00.0 on host 127.0.0.1" in line
    line = one_line_error(cli(hosts["a"], nothing_local, "define", "ta", "--gpu", "4c:00.0"), 2)
    assert "no PCI device 0000:4c:00.0 on host 127.0.0.1" in line


def test_unknown_bar_sizes_ask_for_the_mmio_window(hosts, nothing_local):
    line = one_line_error(cli(hosts["b"], nothing_local, "define", "tb", "--gpu", "4c:00.0",
                              "--print-xml"), 2)
    assert "0000:4c:00.0 (H200)" in line and "pass --mmio-window SIZE" in line
    # the override is checked against what the table knows
    line = one_line_error(cli(hosts["a"], nothing_local, "define", "ta", "--gpu", "17:00.0",
                              "--mmio-window", "64G", "--print-xml"), 2)
    assert "--mmio-window 64G is smaller than the 256G the devices' BARs need" in line
    rounded = cli(hosts["b"], nothing_local, "define", "tb", "--gpu", "4c:00.0",
                  "--mmio-window", "300G", "--print-xml")
    assert rounded.exit_code == 0 and "string=524288" in rounded.stdout
    assert "--mmio-window 300G rounded up to 512G" in rounded.stderr


def test_define_defines_on_that_host(hosts, nothing_local):
    result = cli(hosts["a"], nothing_local, "define", "ta", "--gpu", "17:00.0")
    assert result.exit_code == 0, result.output
    assert "Defined TD 'ta'" in result.stdout
    assert "GPU 0000:17:00.0: managed hostdev, iommufd" in result.stdout
    assert "TDX firmware chosen by libvirt on the host" in result.stdout
    assert "64-bit MMIO window 262144 MiB" in result.stdout


def test_remote_paths_are_that_hosts_and_disks_come_from_its_volumes(hosts, nothing_local):
    """--disk is never looked for here: a storage volume there says it exists (and how
    libvirt sees it); a path in no pool is unknown, and says so."""
    ok = cli(hosts["a"], nothing_local, "define", "ta", "--gpu", "17:00.0", "--print-xml",
             "--disk", f"{IMAGES}/a-boot.qcow2", "--disk-format", "qcow2",
             "--kernel", "/boot/vmlinuz-remote", "--cmdline", "console=ttyS0")
    assert ok.exit_code == 0 and ok.stderr == "", ok.output
    assert f"<source file=\"{IMAGES}/a-boot.qcow2\"/>" in ok.stdout.replace("'", '"')

    unknown = cli(hosts["a"], nothing_local, "define", "ta", "--gpu", "17:00.0", "--print-xml",
                  "--disk", "/srv/not-in-a-pool.raw")
    assert unknown.exit_code == 0
    assert ("has it in no storage pool, so whether it exists on 127.0.0.1 is unknown"
            in unknown.stderr)

    mismatch = cli(hosts["a"], nothing_local, "define", "ta", "--gpu", "17:00.0", "--print-xml",
                   "--disk", f"{IMAGES}/a-boot.qcow2")
    assert "libvirt on 127.0.0.1 sees a qcow2 image, used as raw" in mismatch.stderr

    line = one_line_error(cli(hosts["a"], nothing_local, "define", "ta", "--gpu", "17:00.0",
                              "--disk", f"{IMAGES}/a-backed.qcow2", "--disk-format", "qcow2"), 2)
    assert "reports a backing file" in line and "--allow-backing-file" in line

    line = one_line_error(cli(hosts["a"], nothing_local, "define", "ta", "--disk", "rel/disk.raw"), 2)
    assert "give the absolute path of the file on the host that runs the TD" in line


def test_other_dialects_need_the_firmware_named(hosts, nothing_local):
    line = one_line_error(cli(hosts["a"], nothing_local, "define", "ta", "--gpu", "17:00.0",
                              "--dialect", "qemu-args", "--print-xml"), 2)
    assert "pass --ovmf PATH, its path on 127.0.0.1" in line
    named = cli(hosts["a"], nothing_local, "define", "ta", "--gpu", "17:00.0", "--dialect",
                "qemu-args", "--ovmf", "/opt/tdx/OVMF.fd", "--print-xml")
    assert named.exit_code == 0 and "/opt/tdx/OVMF.fd" in named.stdout


def test_firmware_is_libvirts_pick_on_the_real_qemu_driver(hosts, nothing_local):
    """The emulated TDX host's real qemu driver (libvirt 12.x), through ssh: tdxvirt names
    no firmware, libvirt picks the descriptor with feature intel-tdx there, at define
    time; the preflight then finds that loader among the ones libvirt lists."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    result = cli(hosts["qemu"], nothing_local, "define", name, "--memory", "2G")
    assert result.exit_code == 0, result.output
    conn = open_connection(hosts["qemu"])
    try:
        domain = conn.lookupByName(name)
        loader = etree.fromstring(domain.XMLDesc(2).encode()).find("os/loader")
        assert (loader.get("type"), loader.text) == ("rom", "/usr/share/ovmf/OVMF.inteltdx.ms.fd")
        facts = facts_for(conn)
        assert isinstance(facts, LibvirtFacts) and facts.tdx_enabled() is True
        assert start_problems(conn, facts, domain.XMLDesc(0)) == []
    finally:
        conn.lookupByName(name).undefine()
        conn.close()


# ---------------------------------------------------------------- start


def test_start_preflight_checks_that_hosts_devices(hosts, nothing_local):
    line = one_line_error(cli(hosts["a"], nothing_local, "start", "td-gone"), 1)
    assert "PCI device 0000:99:00.0 is not on host 127.0.0.1" in line
    line = one_line_error(cli(hosts["a"], nothing_local, "start", "td-a", "--gpu-tool", "/x"), 2)
    assert "--gpu-tool runs NVIDIA's tool on this machine" in line


@pytest.mark.parametrize("host, td", [("a", "td-a"), ("b", "td-b")])
def test_start_on_each_host(hosts, nothing_local, host, td):
    assert cli(hosts[host], nothing_local, "start", td).stdout.strip() == f"Started '{td}'"


def test_define_then_start_in_one_connection(hosts, nothing_local):
    """The library, on one connection (a node file lives as long as its connection)."""
    conn = open_connection(hosts["b"])
    try:
        facts = facts_for(conn, exploding_root("/nonexistent"))
        assert isinstance(facts, LibvirtFacts)
        spec = TDSpec.from_user(name="tb", gpus=["4c:00.0", "cb:00.0"], mmio_window="1T",
                                remote=True)
        td = tds.define_td(conn, facts, spec)
        assert td.plan.mmio_mb == 1024 * 1024 and td.plan.loader is None
        assert facts.mode_reader() is None  # CC modes: unknown from here
        assert tds.start(conn, facts, "tb") is True
        assert conn.lookupByName("tb").isActive()
        # a second TD on the same GPU of that host is refused (that host's domains)
        with pytest.raises(InputError, match="already given to domain 'tb'"):
            tds.assemble_td(conn, facts, TDSpec.from_user(name="tc", gpus=["4c:00.0"],
                                                          mmio_window="256G", remote=True))
    finally:
        conn.close()


# ---------------------------------------------------------------- gpu list


def test_gpu_list_shows_each_hosts_gpus(hosts, nothing_local):
    a = json.loads(cli(hosts["a"], nothing_local, "gpu", "list", "--json").stdout)
    assert [(g["address"], g["model"], g["numa_node"], g["iommu_group"], g["td"]) for g in a] == [
        ("0000:17:00.0", "H100 SXM5 80GB", 1, "7", None),
        ("0000:b8:00.0", "H100 SXM5 80GB", 0, "9", "td-a")]  # host A's domain holds it
    assert a[0]["product"] == "GH100 [H100 SXM5 80GB]" and a[0]["bar_sizes"] == H100_BARS
    assert [(p["address"], p["bridge"]) for p in a[0]["peers"]] == [("0000:16:01.0", True)]

    b = json.loads(cli(hosts["b"], nothing_local, "gpu", "list", "--json").stdout)
    assert [(g["address"], g["model"], g["numa_node"], g["iommu_group"], g["td"]) for g in b] == [
        ("0000:1a:00.0", "H200", 0, "3", "td-b"), ("0000:4c:00.0", "H200", 0, "12", None),
        ("0000:cb:00.0", "H200", 1, "31", None)]
    assert [(g["bar_sizes"], g["largest_bar"]) for g in b] == [(None, None)] * 3
    table = cli(hosts["b"], nothing_local, "gpu", "list").stdout
    assert "unknown" in table.splitlines()[2]  # LARGEST BAR

    line = one_line_error(cli(hosts["a"], nothing_local, "gpu", "list", "--modes"), 2)
    assert "read CC / PPCIe modes there" in line


@pytest.mark.parametrize("args", [("detach", "17:00.0"), ("reattach", "17:00.0"),
                                  ("cc-mode", "17:00.0")])
def test_gpu_changes_are_refused_for_another_host(hosts, nothing_local, args):
    line = one_line_error(cli(hosts["a"], nothing_local, "gpu", *args), 2)
    assert "names another host; run it on that host" in line


def test_host_check_reads_that_hosts_gpus(hosts, nothing_local):
    report = json.loads(cli(hosts["a"], nothing_local, "host", "check", "--json").stdout)
    rows = {r["name"]: r for r in report["checks"]}
    assert rows["gpu 0000:17:00.0: iommu group"]["status"] == "ok"  # its peer is a bridge
    assert rows["gpu 0000:17:00.0: cc mode"]["status"] == "skip"


# ---------------------------------------------------------------- undefine


@pytest.mark.parametrize("host", ["a", "b"])
def test_undefine_remove_storage_deletes_nothing_here(hosts, nothing_local, monkeypatch, host):
    """Each host's td-store records an overlay tdxvirt made there: nothing is deleted
    (here or there), nothing checked here, and the TD stays defined."""
    monkeypatch.setattr("tdxvirt.domain.storage_paths.os.unlink", refuse("deleted a file here"))
    monkeypatch.setattr("tdxvirt.domain.storage_paths._open_parent", refuse("checked a file here"))
    line = one_line_error(cli(hosts[host], nothing_local, "undefine", "td-store",
                              "--remove-storage"), 2)
    assert "a remote host, and tdxvirt deletes no files there" in line
    conn = open_connection(hosts[host])
    try:
        with pytest.raises(InputError, match="deletes no files there"):
            tds.undefine(conn, "td-store", remove_storage=True)
        assert conn.lookupByName("td-store")  # still defined: nothing half-done
        assert tds.undefine(conn, "td-store") == []
    finally:
        conn.close()


# ---------------------------------------------------------------- through a real process


def test_the_command_itself_with_a_gpu_less_host_root(hosts, tmp_path):
    """The installed command, as users run it: this machine's root has no GPU, yet the
    TD gets host A's GPU on its NUMA node."""
    empty = build_host_root(tmp_path / "no-gpu", devices=())
    done = subprocess.run([SCRIPT, "-c", hosts["a"], "--host-root", str(empty.base), "define",
                           "ta", "--gpu", "17:00.0", "--numa", "auto", "--print-xml"],
                          capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "nodeset='1'" in done.stdout or 'nodeset="1"' in done.stdout


# ---------------------------------------------------------------- the pieces


def test_the_guard_catches_a_local_read(sim_uri, nothing_local):
    """The same command with a local URI reads this machine: the guard fails it."""
    result = CliRunner().invoke(main, ["-c", sim_uri, "define", "x", "--gpu", "17:00.0",
                                       "--print-xml"])
    assert isinstance(result.exception, AssertionError)
    assert "built this machine's facts" in str(result.exception)


def test_facts_are_chosen_once_from_the_uri(tmp_path):
    root = build_host_root(tmp_path / "r")
    assert isinstance(facts_for(None, root, "qemu:///system"), LocalFacts)
    assert isinstance(facts_for(None, root, "test+unix:///default?socket=/x"), LocalFacts)
    remote = facts_for(object(), root, "qemu+ssh://gpuhost/system")
    assert isinstance(remote, LibvirtFacts) and remote.where == "host gpuhost"
    assert facts_for(None, remote) is remote


def test_lock_keys_name_the_host(monkeypatch, tmp_path):
    assert host_of("qemu+ssh://GPUHost:2222/system") == "gpuhost"
    assert {host_of(u) for u in ("qemu:///system", "test+unix:///default?socket=/s",
                                 "qemu+ssh://root@127.0.0.1:2222/system",
                                 "qemu+ssh://localhost/system")} == {"localhost"}
    assert locks.gpu_keys("gpuhost-a", ["0000:17:00.0"]) != locks.gpu_keys("gpuhost-b", ["0000:17:00.0"])
    monkeypatch.setenv("TDXVIRT_STATE_DIR", str(tmp_path / "state"))
    with locks.held(locks.gpu_keys("gpuhost-a", ["0000:17:00.0"]), timeout=1):
        with locks.held(locks.gpu_keys("gpuhost-b", ["0000:17:00.0"]), timeout=1):
            pass  # the same address on another host: another GPU
        with pytest.raises(DeviceBusyError, match="pci-0000:17:00.0@gpuhost-a"):
            with locks.held(locks.gpu_keys("gpuhost-a", ["0000:17:00.0"]), timeout=0.2):
                pass  # the same GPU of the same host waits (flock per open file)


def test_nodedev_parsing_gives_the_one_device_record():
    xml = pci_device("0000:17:00.0", NVIDIA, 0x2330, 0x030200, 7, numa=1, driver="vfio-pci")
    device = parse_nodedev_xml(xml)
    assert device.address == PciAddress.parse("17:00.0") and device.driver == "vfio-pci"
    assert device.bar_sizes == tuple(H100_BARS) and device.mmio_bytes == sum(H100_BARS)
    h200 = parse_nodedev_xml(pci_device("0000:4c:00.0", NVIDIA, 0x233B, 0x030200, 12))
    assert h200.bar_sizes is None and h200.mmio_bytes is None and h200.numa_node is None


def test_a_remote_h200_sxm_needs_no_mmio_window():
    """The H200 SXM 141GB's BARs, read from a real one (tdxvirt/sim/data/h200-sxm-141gb):
    one needs a 512 GiB window, eight 4 TiB; no --mmio-window on a remote H200 host."""
    from tdxvirt.domain.policy import plan_mmio

    h200 = parse_nodedev_xml(pci_device("0000:4c:00.0", NVIDIA, 0x2335, 0x030200, 12))
    assert h200.bar_sizes == (16 << 20, 256 << 30, 32 << 20)
    assert plan_mmio([h200], None)[0] == 512 * 1024
    assert plan_mmio([h200] * 8, None)[0] == 4 * 1024 * 1024


def test_integrity_accepts_libvirts_firmware_pick_only_for_a_td():
    xml = """<domain type='kvm'><name>x</name><os firmware='efi'><type>hvm</type></os>
      <features><smm state='off'/><pmu state='off'/><ioapic driver='qemu'/></features>
      <cpu mode='host-passthrough'/>
      <launchSecurity type='tdx'><policy>0x10000000</policy></launchSecurity></domain>"""
    assert integrity_problems(xml) == []
    no_pick = xml.replace(" firmware='efi'", "")
    assert [p.what for p in integrity_problems(no_pick)] == ["its firmware (<os><loader>) was removed"]
