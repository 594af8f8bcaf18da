"""Blackwell GPUs (issue 28): identities and BARs, multi-GPU passthrough (MPT) as its own
mode beside Hopper's protected PCIe, on a fake HGX B200/B300 host root (tests/gpu_fakes:
the device ids NVIDIA's tool names, the large BARs users measured) and libvirt's
TDX-aware test driver (real daemon, real XML validation)."""

from __future__ import annotations

import subprocess
import uuid

import pytest
from gpu_fakes import HGX_GPUS, HGX_SWITCHES, blackwell, build, h100, hgx_b200_devices, nvswitch
from lxml import etree

from tdxvirt.domain.spec import TDSpec
from tdxvirt.errors import InputError
from tdxvirt.host.nvidia import BLACKWELL_GEN, HOPPER_GEN, generation, known_bar_sizes, model_name
from tdxvirt.host.pci import read_device
from tdxvirt.lifecycle import tds
from tdxvirt.pci import PciAddress


def _spec(name, gpus, **options):
    return TDSpec.from_user(name=name, gpus=list(gpus), **options)


@pytest.fixture
def hgx_b200(tmp_path):
    return build(tmp_path / "b200", hgx_b200_devices())


def _hostdevs(conn, name):
    root = etree.fromstring(conn.lookupByName(name).XMLDesc(0).encode())
    return root, root.findall("devices/hostdev")


def test_blackwell_gpus_are_named_with_the_bar_read_from_the_device(hgx_b200):
    device = read_device(hgx_b200, PciAddress.parse(HGX_GPUS[0]))
    assert (model_name(device), generation(device)) == ("B200", BLACKWELL_GEN)
    assert max(device.bar_sizes) == 256 << 30  # the device's own resource file
    # a remote host's B200 (no BARs through libvirt): the measured size, small BARs bounded
    assert known_bar_sizes(0x10DE, 0x2901) == (256 << 30, 1 << 30)
    assert known_bar_sizes(0x10DE, 0x3182)[0] == 512 << 30
    assert known_bar_sizes(0x10DE, 0x2330) == (16 << 20, 128 << 30, 32 << 20)  # H100 unchanged


def test_gpu_list_names_every_blackwell_gpu_with_its_bar(hgx_b200):
    from conftest import TDXVIRT

    listed = subprocess.run([TDXVIRT, "-c", "test:///default", "--host-root", str(hgx_b200.base),
                             "gpu", "list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    rows = [line for line in listed.stdout.splitlines() if line.startswith("0000:")]
    assert [row.split()[0] for row in rows] == list(HGX_GPUS)  # ConnectX functions are not GPUs
    assert all(" B200 " in row and "256 GiB" in row for row in rows)


def test_eight_b200s_go_into_one_td_each_behind_its_root_port_with_a_4_tib_window(conn, hgx_b200, td_name):
    td = tds.define_td(conn, hgx_b200, _spec(td_name, HGX_GPUS, memory="64G", vcpus=8))
    domain, hostdevs = _hostdevs(conn, td_name)
    addresses = [h.find("source/address") for h in hostdevs]
    assert [f"{int(a.get('domain'), 16):04x}:{int(a.get('bus'), 16):02x}:00.0" for a in addresses] \
        == list(HGX_GPUS)
    assert all(h.find("driver") is not None and h.find("driver").get("iommufd") == "yes" for h in hostdevs)
    # each on its own bus: the root port with that index
    assert len({h.find("address").get("bus") for h in hostdevs}) == 8
    # 8 x (256 GiB + small BARs) > 2 TiB: the next power of two
    assert td.plan.mmio_mb == 4 * 1024 * 1024
    assert not any("8 TiB" in w for w in td.plan.warnings)
    assert [h.kind for h in td.plan.hostdevs] == ["gpu"] * 8


def test_eight_b300s_need_8_tib_and_the_reported_iommufd_failure_is_said(conn, tmp_path, td_name):
    host = build(tmp_path / "b300", hgx_b200_devices(model="B300"))
    td = tds.define_td(conn, host, _spec(td_name, HGX_GPUS, memory="64G", vcpus=8))
    assert td.plan.mmio_mb == 8 * 1024 * 1024
    assert any("8 TiB or more was reported to break the iommufd bind" in w for w in td.plan.warnings)


@pytest.mark.parametrize("count", [3, 5, 6, 7])
def test_other_counts_of_blackwell_gpus_are_refused_naming_the_counts(conn, hgx_b200, td_name, count):
    with pytest.raises(InputError, match=r"takes 1, 2, 4 or 8 GPUs per TD"):
        tds.define_td(conn, hgx_b200, _spec(td_name, HGX_GPUS[:count]))
    assert td_name not in conn.listDefinedDomains()


def test_ppcie_on_blackwell_is_refused_with_the_mode_it_uses_instead(conn, hgx_b200, td_name):
    with pytest.raises(InputError, match=r"--ppcie is Hopper's protected PCIe mode; Blackwell"):
        tds.define_td(conn, hgx_b200, _spec(td_name, HGX_GPUS[:2], ppcie=True))


def test_hopper_and_blackwell_in_one_td_are_refused(conn, tmp_path, td_name):
    host = build(tmp_path / "mixed", (h100("0000:38:00.0", driver="vfio-pci"),
                                      blackwell(HGX_GPUS[0], group=10)))
    with pytest.raises(InputError, match=r"GPUs of two generations in one TD \(Blackwell: "
                                         r"0000:18:00.0 \(B200\); Hopper: 0000:38:00.0"):
        tds.define_td(conn, host, _spec(td_name, ["0000:38:00.0", HGX_GPUS[0]]))
    assert generation(read_device(host, PciAddress.parse("0000:38:00.0"))) == HOPPER_GEN


def test_an_nvswitch_in_a_blackwell_td_is_refused(conn, tmp_path, td_name):
    host = build(tmp_path / "sw", (blackwell(HGX_GPUS[0], group=10), nvswitch(HGX_SWITCHES[0], group=30)))
    with pytest.raises(InputError, match="no NVSwitch goes into a Blackwell TD"):
        tds.define_td(conn, host, _spec(td_name, [HGX_GPUS[0], HGX_SWITCHES[0]]))


def test_a_refusal_is_one_line_from_the_command_line_and_defines_nothing(conn, sim_uri, hgx_b200):
    from conftest import TDXVIRT

    name = f"t-{uuid.uuid4().hex[:8]}"
    args = [TDXVIRT, "-c", sim_uri, "--host-root", str(hgx_b200.base), "define", name]
    for gpu in HGX_GPUS[:3]:
        args += ["--gpu", gpu]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("tdxvirt: error: 3 Blackwell GPUs: ")
    assert name not in conn.listDefinedDomains()


def test_gpu_cc_mode_ppcie_on_a_blackwell_gpu_is_refused_before_the_tool_runs(tmp_path, monkeypatch):
    from gpu_fakes import STANDIN, StandinTool

    from tdxvirt.gpu import admin_tool, ccmode

    root = build(tmp_path / "b", hgx_b200_devices())
    tool = StandinTool(root, tmp_path)
    for name, value in tool.env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InputError, match="Blackwell GPU: PPCIe is Hopper's multi-GPU mode"):
        ccmode.set_ppcie(root, admin_tool.locate(str(STANDIN)),
                         [read_device(root, PciAddress.parse(HGX_GPUS[0]))], "on")
    assert tool.runs() == []


# --- host check: drivers, the NVLink fabric, the address width -----------------------

def _host_rows(root) -> dict:
    from tdxvirt.doctor import gpuhost
    from tdxvirt.doctor.context import Context
    from tdxvirt.host.commands import RecordingRunner

    return {c.name: c for c in gpuhost.checks(Context(root, runner=RecordingRunner()))}


def _fabric_ready(root, policy: str | None = "symmetric") -> None:
    from gpu_fakes import add_process

    add_process(root, 4101, "nv-fabricmanage", [])  # /proc's comm: 15 characters of the name
    add_process(root, 4102, "nvlsm", [])
    config = root.path("/usr/share/nvidia/nvswitch/fabricmanager.cfg")
    config.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Fabric Manager", "FABRIC_MODE=0"]
    if policy is not None:
        lines += ["#PARTITION_RAIL_POLICY=greedy", f"PARTITION_RAIL_POLICY={policy}"]
    config.write_text("\n".join(lines) + "\n")


def test_host_check_names_a_missing_fabric_manager_and_subnet_manager(hgx_b200):
    rows = _host_rows(hgx_b200)
    for name, says in (("fabric manager", "install and start nvidia-fabricmanager"),
                       ("nvlink subnet manager", "nvlsm")):
        assert rows[name].status == "fail" and "2 ConnectX switch-management" in rows[name].found
        assert says in rows[name].remedy
    assert rows["fabric manager: rail policy"].status == "fail"


@pytest.mark.parametrize("policy, status", [("symmetric", "ok"), ("1", "fail"), (None, "fail")])
def test_the_rail_policy_must_be_the_word_symmetric(hgx_b200, policy, status):
    _fabric_ready(hgx_b200, policy)
    rows = _host_rows(hgx_b200)
    assert rows["fabric manager"].status == "ok" and rows["nvlink subnet manager"].status == "ok"
    assert rows["fabric manager: rail policy"].status == status
    if status == "fail":
        assert "PARTITION_RAIL_POLICY=symmetric (the word)" in rows["fabric manager: rail policy"].remedy


def test_a_hopper_host_has_no_fabric_rows(tmp_path):
    from gpu_fakes import hgx_devices

    rows = _host_rows(build(tmp_path / "h", hgx_devices()))
    assert "fabric manager" not in rows


@pytest.mark.parametrize("modules, status, says", [
    ("kvm_intel 1 0 - Live 0x0\nvfio_pci 1 0 - Live 0x0\n", "ok", "none of nouveau, nova_core, nvidia"),
    ("nova_core 40960 0 - Live 0x0\n", "warn", "after the reset that applies its CC mode"),
    ("nouveau 2000000 0 - Live 0x0\nnvidia 1 0 - Live 0x0\n", "warn", "nouveau binds any NVIDIA GPU"),
])
def test_host_drivers_that_would_take_the_gpus_are_named(hgx_b200, modules, status, says):
    hgx_b200.path("/proc/modules").write_text(modules)
    row = _host_rows(hgx_b200)["gpu host drivers"]
    assert row.status == status and says in row.found
    if "nouveau" in modules or "nova_core" in modules:
        assert "`tdxvirt host setup` blacklists" in row.remedy


@pytest.mark.parametrize("bits, status", [(46, "ok"), (42, "fail")])
def test_the_address_width_must_hold_the_window_of_all_the_boards_gpus(hgx_b200, bits, status):
    cpuinfo = hgx_b200.path("/proc/cpuinfo")
    cpuinfo.write_text(cpuinfo.read_text() + f"address sizes\t: {bits} bits physical, 57 bits virtual\n")
    row = _host_rows(hgx_b200)["gpu: address width"]
    assert row.status == status and "4096 GiB window 8 GPU(s) need" in row.found
