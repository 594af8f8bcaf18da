"""Host facts read through fake host roots built from the real H100's sysfs values."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tdxvirt.errors import HostNotReadyError, InputError, NotFoundError
from tdxvirt.host import HostRoot
from tdxvirt.host.firmware import find_tdx_ovmf
from tdxvirt.host.nvidia import is_passthrough_candidate, model_name, require_gpu
from tdxvirt.host.pci import read_device
from tdxvirt.pci import PciAddress
from tdxvirt.sim.hostroot import FakePciDevice, build_host_root
from tdxvirt.units import GIB, MIB

H100 = PciAddress.parse("38:00.0")
SHARED_FIXTURE = Path(__file__).resolve().parents[1] / "../shared/fixtures/h100-sxm5-80gb/sysfs"


def test_h100_facts_match_the_real_sysfs(host_root):
    device = read_device(host_root, H100)
    assert (device.vendor, device.device, device.pci_class) == (0x10DE, 0x2330, 0x030200)
    assert device.bar_sizes == (16 * MIB, 128 * GIB, 32 * MIB)
    assert device.numa_node is None  # the real GPU said -1
    assert device.driver == "vfio-pci"
    assert device.iommu_group == "42"
    assert model_name(device) == "H100 SXM5 80GB"
    require_gpu(device)


@pytest.mark.skipif(not SHARED_FIXTURE.is_dir(), reason="shared fixtures not beside the repo")
def test_packaged_fixture_is_the_shared_one():
    packaged = Path(__file__).resolve().parents[1] / "tdxvirt/sim/data/h100-sxm5-80gb/sysfs"
    for source in SHARED_FIXTURE.iterdir():
        assert (packaged / source.name).read_bytes() == source.read_bytes(), source.name


def test_missing_device_is_not_found(host_root):
    with pytest.raises(NotFoundError, match="no PCI device 0000:39:00.0"):
        read_device(host_root, PciAddress.parse("39:00.0"))


def test_non_nvidia_device_is_refused(tmp_path):
    nic = FakePciDevice("0000:17:00.0", overrides={
        "vendor": "0x8086", "device": "0x1593", "class": "0x020000", "numa_node": "0"})
    root = build_host_root(tmp_path / "r", devices=(nic,))
    device = read_device(root, PciAddress.parse("17:00.0"))
    assert device.numa_node == 0
    assert not is_passthrough_candidate(device)
    with pytest.raises(InputError, match="not an NVIDIA GPU"):
        require_gpu(device)


def test_unknown_nvidia_id_is_shown_as_hex(tmp_path):
    root = build_host_root(tmp_path / "r", devices=(
        FakePciDevice("0000:38:00.0", overrides={"device": "0x2999", "class": "0x030000"}),))
    device = read_device(root, H100)
    assert model_name(device) == "NVIDIA 0x2999"
    assert is_passthrough_candidate(device)


def test_tdx_ovmf_from_the_real_debian_descriptor(host_root):
    assert find_tdx_ovmf(host_root) == "/usr/share/ovmf/OVMF.inteltdx.ms.fd"


def test_etc_descriptor_overrides_usr_share_of_same_name(host_root):
    etc = host_root.path("/etc/qemu/firmware")
    etc.mkdir(parents=True)
    descriptor = json.loads(host_root.read_text(
        "/usr/share/qemu/firmware/60-edk2-x86_64-inteltdx.json"))
    descriptor["mapping"]["filename"] = "/opt/tdx/OVMF.fd"
    (etc / "60-edk2-x86_64-inteltdx.json").write_text(json.dumps(descriptor))
    assert find_tdx_ovmf(host_root) == "/opt/tdx/OVMF.fd"


def test_broken_descriptor_does_not_hide_a_good_one(host_root):
    host_root.path("/usr/share/qemu/firmware/10-broken.json").write_text("{not json")
    assert find_tdx_ovmf(host_root) == "/usr/share/ovmf/OVMF.inteltdx.ms.fd"


def test_no_tdx_firmware_is_host_not_ready(tmp_path):
    root = build_host_root(tmp_path / "r", tdx_firmware=False)
    with pytest.raises(HostNotReadyError, match="ovmf-inteltdx"):
        find_tdx_ovmf(root)


def test_host_root_maps_absolute_paths(tmp_path):
    root = HostRoot(tmp_path)
    assert root.path("/sys/bus/pci") == tmp_path / "sys/bus/pci"
    assert root.read_value("/nonexistent") is None
    assert root.listdir("/nonexistent") == []


def test_build_host_root_replaces_an_old_tree(tmp_path):
    build_host_root(tmp_path / "r")
    (tmp_path / "r/stale").write_text("x")
    build_host_root(tmp_path / "r")
    assert not (tmp_path / "r/stale").exists()
    shutil.rmtree(tmp_path / "r")
