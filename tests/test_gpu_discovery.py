"""GPU discovery on fake sysfs trees built from the real H100, libvirt's node devices
(libvirt's own test driver with a node file), and TDs defined on the real daemon."""

from __future__ import annotations

from click.testing import CliRunner
from gpu_fakes import HGX_GPUS, HGX_SWITCHES, audio, bridge, build, h100, hgx_devices, nic
from lxml import etree

from tdxvirt.cli import main
from tdxvirt.facts.libvirt import parse_nodedev_xml
from tdxvirt.gpu.discovery import discover
from tdxvirt.pci import PciAddress
from tdxvirt.units import GIB, MIB
from tdxvirt.virt.conn import open_connection


def by_address(records):
    return {r.address: r for r in records}


def test_one_h100_alone_in_its_group(tmp_path):
    root = build(tmp_path / "r", (h100("0000:38:00.0"),))
    [gpu] = discover(root)
    assert (gpu.address, gpu.kind, gpu.model, gpu.device_id) == (
        "0000:38:00.0", "GPU", "H100 SXM5 80GB", "0x2330")
    assert gpu.driver == "nvidia" and gpu.iommu_group == "42" and gpu.peers == ()
    assert gpu.numa_node is None  # the real GPU's numa_node is -1
    assert gpu.bar_sizes == (16 * MIB, 128 * GIB, 32 * MIB) and gpu.largest_bar == 128 * GIB
    assert gpu.td is None and gpu.product is None


def test_group_members_are_named_with_driver_and_bridges_marked(tmp_path):
    root = build(tmp_path / "r", (h100("0000:38:00.0"), audio("0000:38:00.1", 42),
                                  bridge("0000:37:00.0", 42)))
    [gpu] = discover(root)  # the audio function is not a GPU: listed only as a peer
    peers = {p.address: p for p in gpu.peers}
    assert peers["0000:38:00.1"].driver == "snd_hda_intel"
    assert peers["0000:38:00.1"].description == "multimedia (audio) function 10de:228b"
    assert not peers["0000:38:00.1"].bridge
    assert peers["0000:37:00.0"].bridge and peers["0000:37:00.0"].driver == "pcieport"


def test_hgx_board_eight_gpus_four_nvswitches_two_numa_nodes(tmp_path):
    root = build(tmp_path / "r", hgx_devices(driver="nvidia"))
    records = by_address(discover(root))
    assert sorted(records) == sorted(HGX_GPUS + HGX_SWITCHES)
    assert [records[a].numa_node for a in HGX_GPUS] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert {records[a].kind for a in HGX_GPUS} == {"GPU"}
    assert {(records[a].kind, records[a].model) for a in HGX_SWITCHES} == {("NVSwitch", "NVSwitch")}
    assert records[HGX_SWITCHES[0]].largest_bar == 32 * MIB
    assert len({r.iommu_group for r in records.values()}) == 12


def test_unknown_nvidia_id_is_listed_as_hex_and_others_are_not(tmp_path):
    root = build(tmp_path / "r", (h100("0000:38:00.0", device_id="0x2999"),
                                  nic("0000:17:00.0", 7)))
    [gpu] = discover(root)
    assert gpu.model == "NVIDIA 0x2999" and gpu.device_id == "0x2999"


def test_numa_minus_one_and_a_real_node(tmp_path):
    root = build(tmp_path / "r", (h100("0000:38:00.0", group=1),
                                  h100("0000:b8:00.0", group=2, numa=1)))
    records = by_address(discover(root))
    assert records["0000:38:00.0"].numa_node is None
    assert records["0000:b8:00.0"].numa_node == 1


NODE_XML = """<node>
  <cpu><nodes>2</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads>
    <active>4</active><mhz>2000</mhz><model>x86_64</model></cpu>
  <memory>8192000</memory>
  <device>
    <name>pci_0000_38_00_0</name>
    <parent>computer</parent>
    <driver><name>vfio-pci</name></driver>
    <capability type='pci'>
      <class>0x030200</class>
      <domain>0</domain><bus>56</bus><slot>0</slot><function>0</function>
      <product id='0x2330'>GH100 [H100 SXM5 80GB]</product>
      <vendor id='0x10de'>NVIDIA Corporation</vendor>
      <iommuGroup number='42'>
        <address domain='0x0000' bus='0x38' slot='0x00' function='0x0'/>
      </iommuGroup>
      <numa node='1'/>
    </capability>
  </device>
</node>
"""


def test_libvirt_node_device_facts_win_where_libvirt_has_them(tmp_path):
    """libvirt's own test driver, loaded with a node file holding the H100 as libvirt
    describes PCI devices; it drops <driver>, so the driver comes from sysfs."""
    node = tmp_path / "node.xml"
    node.write_text(NODE_XML)
    root = build(tmp_path / "r", (h100("0000:38:00.0"), h100("0000:b8:00.0", group=2)))
    conn = open_connection(f"test://{node}")
    try:
        records = by_address(discover(root, conn))
    finally:
        conn.close()
    libvirt_known = records["0000:38:00.0"]
    assert libvirt_known.product == "GH100 [H100 SXM5 80GB]"
    assert libvirt_known.numa_node == 1  # libvirt says 1; sysfs says -1
    assert libvirt_known.driver == "nvidia"  # the test driver drops <driver>: sysfs
    assert libvirt_known.iommu_group == "42"
    assert records["0000:b8:00.0"].product is None  # libvirt does not know it


def test_nodedev_xml_parsing_keeps_the_driver_and_skips_other_devices():
    device = etree.tostring(etree.fromstring(NODE_XML).find("device"), encoding="unicode")
    facts = parse_nodedev_xml(device)
    assert facts.address == PciAddress.parse("38:00.0") and facts.driver == "vfio-pci"
    assert facts.group_addresses == (PciAddress.parse("38:00.0"),)
    assert parse_nodedev_xml("<device><name>computer</name><capability type='system'/></device>") is None


def test_the_td_holding_a_gpu_is_shown(conn, sim_uri, gpu_host, td_name):
    host, address = gpu_host
    defined = CliRunner().invoke(main, ["-c", sim_uri, "--host-root", str(host.base),
                                        "define", td_name, "--gpu", address])
    assert defined.exit_code == 0, defined.output
    records = by_address(discover(host, conn))
    assert records[address].td == td_name
