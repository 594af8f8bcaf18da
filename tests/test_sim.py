"""The simulated host: domains outlive the process that defined them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tdxvirt.sim import control, keeper

SCRIPT = os.path.join(os.path.dirname(sys.executable), "tdxvirt")


def tdxvirt(*args, host_root=None, uri=None):
    extra = ["--host-root", str(host_root)] if host_root else []
    extra += ["-c", uri] if uri else []
    return subprocess.run([SCRIPT, "--sim", *extra, *args], capture_output=True, text=True,
                          check=False)


def test_test_driver_state_survives_across_separate_processes(gpu_host, td_name, sim_uri):
    host, gpu = gpu_host
    assert tdxvirt("define", td_name, "--gpu", gpu, host_root=host.base, uri=sim_uri).returncode == 0
    listed = json.loads(tdxvirt("list", "--json", uri=sim_uri).stdout)
    assert [r["gpus"] for r in listed if r["name"] == td_name] == [[gpu]]
    assert tdxvirt("start", td_name, host_root=host.base, uri=sim_uri).returncode == 0
    assert tdxvirt("destroy", td_name, uri=sim_uri).returncode == 0
    assert tdxvirt("undefine", td_name, uri=sim_uri).returncode == 0
    assert td_name not in tdxvirt("list", uri=sim_uri).stdout


def test_status_reports_a_running_simulated_host(sim):
    status = control.status(sim)
    assert status.installed and status.daemon and status.host_root
    assert status.keeper_pid == keeper.running_pid(sim.keeper_pidfile)
    assert status.uri.startswith("qemu+unix:///system?socket=")  # what --sim targets
    assert status.test_uri.startswith("test+unix:///default?socket=")
    done = tdxvirt("sim", "status")
    assert "daemon:     running" in done.stdout
    assert f"qemu driver: {status.uri}" in done.stdout
    assert f"test driver: {status.test_uri}" in done.stdout


def test_up_is_idempotent(sim):
    assert control.up(sim) == []


def test_stale_keeper_pidfile_is_not_running(tmp_path):
    pidfile = tmp_path / "keeper.pid"
    pidfile.write_text("999999999\n")
    assert keeper.running_pid(pidfile) is None
    pidfile.write_text("garbage\n")
    assert keeper.running_pid(pidfile) is None


def test_default_sim_host_has_the_h100_at_38(sim):
    from tdxvirt.host import HostRoot
    from tdxvirt.host.firmware import find_tdx_ovmf
    from tdxvirt.host.pci import read_device
    from tdxvirt.pci import PciAddress

    root = sim.host()
    assert read_device(root, PciAddress.parse("38:00.0")).device == 0x2330
    ovmf = find_tdx_ovmf(root)
    assert root.path(ovmf).stat().st_size > 1024 * 1024  # the real forky OVMF
    # one host: the files tdxvirt reads are the ones the daemon uses, not copies
    for used_by_libvirt in (ovmf, "/etc/libvirt/qemu.conf", "/usr/bin/qemu-system-x86_64"):
        assert root.path(used_by_libvirt) == sim.chroot / used_by_libvirt.lstrip("/")
    assert root.path("/sys/bus/pci/devices") == sim.devices / "sys/bus/pci/devices"
    assert isinstance(root, HostRoot) and root.files_in_root


def test_libvirt_lists_the_simulated_gpu_and_virt_xml_adds_it_by_address(sim, qemu_conn):
    """libvirt's node-device driver (libudev) finds the simulated H100 where the kernel
    puts a PCI device, and nothing of this machine's own PCI bus."""
    import subprocess
    import uuid

    from lxml import etree

    pci = qemu_conn.listAllDevices(2)  # VIR_CONNECT_LIST_NODE_DEVICES_CAP_PCI_DEV
    assert [d.name() for d in pci] == ["pci_0000_38_00_0"]
    device = etree.fromstring(qemu_conn.nodeDeviceLookupByName("pci_0000_38_00_0").XMLDesc())
    assert device.findtext("driver/name") == "vfio-pci"
    assert device.find("capability/product").get("id") == "0x2330"
    assert device.find("capability/iommuGroup").get("number") == "42"
    name = f"vm-{uuid.uuid4().hex[:6]}"
    qemu_conn.defineXML(VM_WITH_NIC.format(name=name))
    try:
        added = subprocess.run(["virt-xml", "-c", sim.qemu_uri, name, "--add-device",
                                "--hostdev", "38:00.0"], capture_output=True, text=True)
        assert added.returncode == 0, added.stderr
        xml = etree.fromstring(qemu_conn.lookupByName(name).XMLDesc())
        assert xml.find("devices/hostdev/source/address").get("bus") == "0x38"
    finally:
        qemu_conn.lookupByName(name).undefine()


# An ordinary VM with a NIC: libvirt makes its tap through the namespace's /dev/net/tun
VM_WITH_NIC = ("<domain type='kvm'><name>{name}</name><memory unit='MiB'>128</memory>"
               "<vcpu>1</vcpu><os><type arch='x86_64' machine='q35'>hvm</type></os><devices>"
               "<interface type='ethernet'><model type='virtio'/></interface>"
               "<controller type='usb' model='none'/><memballoon model='none'/></devices></domain>")


def test_a_nic_starts_and_libvirt_creates_disks_with_qemu_img_on_the_simulated_host(sim, qemu_conn):
    """What virt-manager's Run of a VM with a NIC and its Add Disk need from the host:
    a tap device (in the daemon's own network namespace) and qemu-img."""
    import subprocess
    import uuid

    from lxml import etree

    name = f"vm-{uuid.uuid4().hex[:6]}"
    domain = qemu_conn.defineXML(VM_WITH_NIC.format(name=name))
    try:
        domain.create()
        live = etree.fromstring(domain.XMLDesc())
        assert live.find("devices/interface/target").get("dev").startswith("vnet")
        domain.destroy()
    finally:
        domain.undefine()
    pool = f"pool-{uuid.uuid4().hex[:6]}"
    directory = sim.chroot / "var/lib/libvirt/images" / pool
    directory.mkdir(parents=True)
    virsh = ["virsh", "-c", sim.qemu_uri]
    try:
        for step in (["pool-create-as", pool, "dir", "--target", f"/var/lib/libvirt/images/{pool}"],
                     ["vol-create-as", pool, "disk.qcow2", "16M", "--format", "qcow2"]):
            done = subprocess.run(virsh + step, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
        assert (directory / "disk.qcow2").read_bytes()[:4] == b"QFI\xfb"  # made by qemu-img
    finally:
        subprocess.run(virsh + ["vol-delete", "disk.qcow2", "--pool", pool], capture_output=True)
        subprocess.run(virsh + ["pool-destroy", pool], capture_output=True)
        directory.rmdir()


def test_simulated_gpu_has_cc_mode_through_the_tool_stand_in(sim):
    """The simulated host answers CC-mode queries like NVIDIA's tool, from a file."""
    before = tdxvirt("gpu", "cc-mode", "38:00.0", "--json")
    assert before.returncode == 0, before.stderr
    original = json.loads(before.stdout)[0]["cc_mode"]
    try:
        assert tdxvirt("gpu", "cc-mode", "38:00.0", "--set", "on").returncode == 0
        assert json.loads(tdxvirt("gpu", "cc-mode", "38:00.0", "--json").stdout)[0]["cc_mode"] == "on"
    finally:
        tdxvirt("gpu", "cc-mode", "38:00.0", "--set", original)
