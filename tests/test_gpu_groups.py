"""IOMMU-group rules and busy checks, planned against fake sysfs / procfs trees."""

from __future__ import annotations

import pytest
from gpu_fakes import add_nvidia_information, add_process, add_vfio_cdev, audio, bridge, build, h100, nic

from tdxvirt.errors import DeviceBusyError, HostNotReadyError, InputError, NotFoundError
from tdxvirt.gpu import vfio
from tdxvirt.gpu.devices import read_targets
from tdxvirt.gpu.groups import read_group
from tdxvirt.host.iommu import is_bridge
from tdxvirt.pci import PciAddress

GPU = "0000:38:00.0"


def plan(root, *bdfs, force=False):
    return vfio.plan_detach(root, read_targets(root, bdfs), force=force)


def moving(plan_):
    return {m.address: (m.reason, m.noop) for m in plan_.moves}


def test_alone_in_its_group_only_the_gpu_moves(tmp_path):
    root = build(tmp_path / "r", (h100(GPU),))
    assert moving(plan(root, GPU)) == {GPU: ("requested", None)}


def test_audio_function_moves_with_its_gpu(tmp_path):
    root = build(tmp_path / "r", (h100(GPU), audio("0000:38:00.1", 42)))
    assert moving(plan(root, "38:00.0")) == {
        GPU: ("requested", None),
        "0000:38:00.1": (f"IOMMU group 42 of {GPU}", None)}


def test_bridges_stay_with_their_driver(tmp_path):
    root = build(tmp_path / "r", (h100(GPU), bridge("0000:37:00.0", 42)))
    assert moving(plan(root, GPU)) == {GPU: ("requested", None)}
    group = read_group(root, read_targets(root, [GPU])[0])
    assert [m.bridge for m in group.members] == [True, False]


def test_bridge_from_config_header_type_or_class(tmp_path):
    root = build(tmp_path / "r", (h100(GPU), bridge("0000:37:00.0", 42)))
    bridge_config = root.path("/sys/bus/pci/devices/0000:37:00.0/config")
    assert bridge_config.read_bytes()[0x0E] == 0x01
    assert is_bridge(root, PciAddress.parse("37:00.0"), 0x060400)
    bridge_config.unlink()  # unreadable config space: the class decides
    assert is_bridge(root, PciAddress.parse("37:00.0"), 0x060400)
    assert not is_bridge(root, PciAddress.parse("38:00.0"), 0x030200)


def test_group_with_a_nic_in_use_is_refused_naming_it(tmp_path):
    root = build(tmp_path / "r", (h100(GPU), nic("0000:38:00.1", 42)))
    with pytest.raises(DeviceBusyError) as refused:
        plan(root, GPU)
    message = str(refused.value)
    assert "0000:38:00.1 (network controller 8086:1593)" in message
    assert "driver ice, network interface ens1f0" in message
    assert "\n" not in message


def test_a_non_nvidia_endpoint_without_driver_moves_along(tmp_path):
    root = build(tmp_path / "r", (h100(GPU), nic("0000:38:00.1", 42, driver=None)))
    assert moving(plan(root, GPU))["0000:38:00.1"] == (f"IOMMU group 42 of {GPU}", None)


def test_no_iommu_group_means_the_iommu_is_off(tmp_path):
    root = build(tmp_path / "r", (h100(GPU, group=None),))
    with pytest.raises(HostNotReadyError, match="intel_iommu=on"):
        plan(root, GPU)


def test_already_on_vfio_is_a_noop_and_two_gpus_of_one_group_move_once(tmp_path):
    root = build(tmp_path / "r", (h100(GPU, driver="vfio-pci"), h100("0000:38:00.1")))
    moves = moving(plan(root, GPU, "38:00.1"))
    assert moves == {GPU: ("requested", "already on vfio-pci"), "0000:38:00.1": ("requested", None)}


@pytest.mark.parametrize("text, error", [
    ("38:00", InputError), ("zz:00.0", InputError), ("39:00.0", NotFoundError)])
def test_bad_input(tmp_path, text, error):
    root = build(tmp_path / "r", (h100(GPU),))
    with pytest.raises(error):
        read_targets(root, [text])


def test_a_device_that_is_not_an_nvidia_gpu_is_refused(tmp_path):
    root = build(tmp_path / "r", (h100(GPU), audio("0000:38:00.1", 42), nic("0000:17:00.0", 7)))
    for text in ("38:00.1", "17:00.0"):
        with pytest.raises(InputError, match="not an NVIDIA GPU or NVSwitch"):
            read_targets(root, [text])


def test_processes_on_the_gpus_device_file_refuse_unless_forced(tmp_path):
    root = build(tmp_path / "r", (h100(GPU), h100("0000:b8:00.0", group=43)))
    add_nvidia_information(root, GPU, 0)
    add_nvidia_information(root, "0000:b8:00.0", 1)
    add_process(root, 4242, "python3", ["/dev/nvidiactl", "/dev/nvidia1", "/dev/null"])
    assert moving(plan(root, GPU))  # only /dev/nvidia1 is held: the other GPU's
    add_process(root, 777, "nvidia-persiste", ["/dev/nvidia0"])
    with pytest.raises(DeviceBusyError) as refused:
        plan(root, GPU)
    assert "nvidia-persiste (pid 777) has /dev/nvidia0 open" in str(refused.value)
    assert "--force" in str(refused.value)
    assert moving(plan(root, GPU, force=True)) == {GPU: ("requested", None)}


def test_without_the_drivers_minor_any_gpu_file_counts(tmp_path):
    root = build(tmp_path / "r", (h100(GPU),))
    add_process(root, 99, "cuda-app", ["/dev/nvidia3"])
    with pytest.raises(DeviceBusyError, match="cuda-app"):
        plan(root, GPU)


def test_reattach_refuses_a_gpu_a_running_vm_holds(tmp_path):
    root = build(tmp_path / "r", (h100(GPU, driver="vfio-pci"),))
    targets = read_targets(root, [GPU])
    assert [m.noop for m in vfio.plan_reattach(root, targets).moves] == [None]
    add_vfio_cdev(root, GPU, "vfio0")
    add_process(root, 5150, "qemu-system-x86", ["/dev/iommu", "/dev/vfio/devices/vfio0"])
    with pytest.raises(DeviceBusyError, match="qemu-system-x86 .pid 5150. has /dev/vfio/devices/vfio0"):
        vfio.plan_reattach(root, targets)


def test_reattach_of_a_gpu_not_on_vfio_is_a_noop(tmp_path):
    root = build(tmp_path / "r", (h100(GPU), audio("0000:38:00.1", 42, driver="vfio-pci")))
    moves = moving(vfio.plan_reattach(root, read_targets(root, [GPU])))
    assert moves == {GPU: ("requested", "not on vfio-pci (driver: nvidia)"),
                     "0000:38:00.1": (f"IOMMU group 42 of {GPU}", None)}
