"""Decisions between the spec and the XML: MMIO window, alignment, root ports."""

from __future__ import annotations

import pytest

from tdxvirt.domain.policy import align_memory, mmio_window_mb, plan_domain
from tdxvirt.domain.spec import TDSpec
from tdxvirt.host.pci import read_device
from tdxvirt.pci import PciAddress
from tdxvirt.sim.hostroot import FakePciDevice, build_host_root
from tdxvirt.units import GIB, MIB


def test_one_h100_needs_at_least_128_gib(host_root):
    device = read_device(host_root, PciAddress.parse("38:00.0"))
    window = mmio_window_mb([device])
    assert window * MIB >= 128 * GIB + 48 * MIB  # the BARs add up past 128 GiB
    assert window == 262144  # rounded to a power of two: 256 GiB
    assert window & (window - 1) == 0


def test_eight_h100s_need_more_than_a_tebibyte(tmp_path):
    addresses = [f"0000:{bus:02x}:00.0" for bus in (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)]
    root = build_host_root(tmp_path / "r", devices=tuple(
        FakePciDevice(a, iommu_group=i) for i, a in enumerate(addresses)))
    devices = [read_device(root, PciAddress.parse(a)) for a in addresses]
    assert mmio_window_mb(devices) * MIB > 1024 * GIB
    assert mmio_window_mb(devices) == 2 * 1024 * 1024


def test_no_devices_keeps_ovmf_default_window():
    assert mmio_window_mb([]) == 32 * 1024


@pytest.mark.parametrize("size, aligned, warned", [
    (16 * GIB, 16 * GIB, False), (2 * MIB + 1, 4 * MIB, True), (1023 * MIB, 1024 * MIB, True),
])
def test_memory_is_2mib_aligned(size, aligned, warned):
    result, warning = align_memory(size)
    assert result == aligned
    assert (warning is not None) == warned


def test_plan_puts_each_gpu_on_its_own_root_port(tmp_path):
    root = build_host_root(tmp_path / "r", devices=(
        FakePciDevice("0000:38:00.0"), FakePciDevice("0000:b8:00.0", iommu_group=43)))
    spec = TDSpec.from_user(name="two", gpus=["38:00.0", "b8:00.0"], memory="1025M")
    devices = [read_device(root, g) for g in spec.gpus]
    plan = plan_domain(spec, gpus=devices, dialect="native", libvirt_version=12_008_000,
                       loader="/fw.fd")
    assert plan.root_ports == (1, 2)
    assert [str(h.source) for h in plan.hostdevs] == ["0000:38:00.0", "0000:b8:00.0"]
    assert plan.iommufd is True
    assert plan.memory_kib == 1026 * 1024
    assert plan.warnings and "2 MiB" in plan.warnings[0]
    assert plan_domain(spec, gpus=devices, dialect="native", libvirt_version=11_006_000,
                       loader="/fw.fd").iommufd is False
