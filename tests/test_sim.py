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

    root = HostRoot(sim.host_root)
    assert read_device(root, PciAddress.parse("38:00.0")).device == 0x2330
    ovmf = find_tdx_ovmf(root)
    assert root.path(ovmf).stat().st_size > 1024 * 1024  # the real forky OVMF, linked


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
