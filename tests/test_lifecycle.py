"""TD lifecycle: the real qemu driver (TCG, plain VMs) for states and timeouts, the
TDX-aware test driver for TDs, preflight, locks and races."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest
from click.testing import CliRunner

from tdxvirt import locks
from tdxvirt.cli import main
from tdxvirt.domain.spec import TDSpec
from tdxvirt.errors import DeviceBusyError, HostNotReadyError, LibvirtOperationError
from tdxvirt.lifecycle import tds
from tdxvirt.lifecycle.preflight import start_problems
from tdxvirt.sim.hostroot import FakePciDevice, build_host_root

SCRIPT = os.path.join(os.path.dirname(sys.executable), "tdxvirt")


@pytest.fixture
def daemon_root(sim):
    """The qemu daemon's own file system (the forky root) as the host root."""
    from tdxvirt.host import HostRoot

    return HostRoot(sim.chroot)


@pytest.fixture
def plain_vm(qemu_conn, daemon_root):
    """A plain (no TDX, no GPU) TCG VM on the real qemu driver: OVMF with no OS,
    which ignores ACPI power-off, as a hung guest would."""
    name = f"p-{uuid.uuid4().hex[:10]}"
    spec = TDSpec.from_user(name=name, tdx=False, virt_type="qemu", memory="256M", vcpus=1)
    tds.define_td(qemu_conn, daemon_root, spec)
    yield name
    domain = qemu_conn.lookupByName(name)
    if domain.isActive():
        domain.destroy()
    domain.undefineFlags(tds.UNDEFINE_NVRAM)


def test_real_qemu_start_shutdown_timeout_force_autostart_undefine(qemu_conn, daemon_root, plain_vm,
                                                                   sim):
    assert tds.start(qemu_conn, daemon_root, plain_vm) is True
    domain = qemu_conn.lookupByName(plain_vm)
    assert domain.isActive()
    # the live status file of the real qemu driver: OVMF's MMIO window reached QEMU
    assert "-fw_cfg" in (sim.chroot / f"run/libvirt/qemu/{plain_vm}.xml").read_text()
    ticks = []
    assert tds.stop(qemu_conn, plain_vm, timeout=1.5, poll=0.2, progress=ticks.append) is False
    assert ticks and domain.isActive()  # the firmware ignored ACPI: the timeout path
    with pytest.raises(LibvirtOperationError, match="is running; stop it first"):
        tds.undefine(qemu_conn, plain_vm)
    assert tds.destroy(qemu_conn, plain_vm) is True
    tds.set_autostart(qemu_conn, plain_vm, True)
    assert domain.autostart() == 1
    tds.set_autostart(qemu_conn, plain_vm, False)
    assert domain.autostart() == 0


def test_stop_force_through_the_cli(qemu_conn, daemon_root, plain_vm, sim):
    tds.start(qemu_conn, daemon_root, plain_vm)
    result = CliRunner().invoke(main, ["-c", sim.qemu_uri, "stop", plain_vm, "--timeout", "1"])
    assert result.exit_code == 1 and "did not power off within 1 s" in result.stderr
    result = CliRunner().invoke(main, ["-c", sim.qemu_uri, "stop", plain_vm, "--timeout", "1",
                                       "--force"])
    assert result.exit_code == 0 and "destroyed it" in result.stdout
    assert not qemu_conn.lookupByName(plain_vm).isActive()


def test_undefine_remove_storage_removes_only_the_overlay(conn, gpu_host, td_name, tmp_path):
    from tdxvirt.config import Config

    host, gpu = gpu_host
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "32M"], check=True)
    tds.define_td(conn, host, TDSpec.from_user(name=td_name, gpus=[gpu], image=str(base)),
                  Config(overlay_dir=str(tmp_path / "img")))
    overlay = tmp_path / "img" / f"{td_name}.qcow2"
    # undefine trusts no directory recorded in the domain: it takes the configured one
    assert tds.undefine(conn, td_name, remove_storage=True,
                        config=Config(overlay_dir=str(tmp_path / "img"))) == [str(overlay)]
    assert not overlay.exists() and base.exists()


def test_undefine_without_remove_storage_keeps_the_overlay(conn, gpu_host, td_name, tmp_path):
    from tdxvirt.config import Config

    host, gpu = gpu_host
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "32M"], check=True)
    tds.define_td(conn, host, TDSpec.from_user(name=td_name, gpus=[gpu], image=str(base)),
                  Config(overlay_dir=str(tmp_path / "img")))
    assert tds.undefine(conn, td_name) == []
    assert (tmp_path / "img" / f"{td_name}.qcow2").exists()


def test_preflight_names_each_problem_and_changes_nothing(conn, tmp_path, td_name):
    host = build_host_root(tmp_path / "r", devices=(
        FakePciDevice("e003:38:00.0", driver="nvidia"),))
    tds.define_td(conn, host, TDSpec.from_user(name=td_name, gpus=["e003:38:00.0"], managed=False))
    (tmp_path / "r/sys/module/kvm_intel/parameters/tdx").write_text("N\n")
    with pytest.raises(HostNotReadyError) as error:
        tds.start(conn, host, td_name)
    message = str(error.value)
    assert "TDX is not enabled in KVM" in message
    assert "bound to nvidia, not vfio-pci" in message and "tdxvirt gpu detach e003:38:00.0" in message
    assert "\n" not in message
    assert not conn.lookupByName(td_name).isActive()
    assert tds.start(conn, host, td_name, skip_preflight=True) is True


def test_preflight_refuses_a_gpu_held_by_a_running_domain(conn, gpu_host, td_name):
    host, gpu = gpu_host
    other = td_name + "-o"
    tds.define_td(conn, host, TDSpec.from_user(name=td_name, gpus=[gpu]))
    tds.define_td(conn, host, TDSpec.from_user(name=other, gpus=[gpu], allow_shared=True))
    try:
        tds.start(conn, host, other)
        with pytest.raises(HostNotReadyError, match=f"in use by running domain '{other}'"):
            tds.start(conn, host, td_name)
    finally:
        tds.destroy(conn, other)
        tds.undefine(conn, other)


def test_preflight_names_missing_firmware_and_disk(conn, gpu_host, td_name, tmp_path):
    host, gpu = gpu_host
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * 512)
    tds.define_td(conn, host, TDSpec.from_user(name=td_name, gpus=[gpu], disk=str(disk)))
    disk.unlink()
    host.path("/usr/share/ovmf/OVMF.inteltdx.ms.fd").unlink()
    # root's record names the firmware it was defined with: its integrity check comes first
    with pytest.raises(HostNotReadyError, match=r"its firmware /usr/share/ovmf/OVMF.inteltdx.ms.fd "
                                                r"\(sha256 \w+ recorded\) is missing; put the recorded file back"):
        tds.start(conn, host, td_name)
    xml = conn.lookupByName(td_name).XMLDesc(0)
    assert re.search("firmware .* does not exist.*disk image .* does not exist",
                     "; ".join(start_problems(conn, host, xml)))


def test_show_xml_and_foreign_td(conn, gpu_host, td_name, sim_uri):
    host, gpu = gpu_host
    tds.define_td(conn, host, TDSpec.from_user(name=td_name, gpus=[gpu]))
    info = tds.show(conn, td_name)
    assert info.row.facts.gpus == (gpu,) and info.row.state == "shut off" and info.problems == ()
    result = CliRunner().invoke(main, ["-c", sim_uri, "show", td_name, "--json"])
    shown = json.loads(result.stdout)
    assert shown["uuid"] == info.uuid and shown["dialect"] == "native" and shown["gpus"] == [gpu]
    xml = CliRunner().invoke(main, ["-c", sim_uri, "xml", td_name]).stdout
    assert xml.startswith("<domain") and gpu.split(":")[0] in xml


def test_reboot_needs_a_running_td(conn, gpu_host, td_name):
    host, gpu = gpu_host
    tds.define_td(conn, host, TDSpec.from_user(name=td_name, gpus=[gpu]))
    with pytest.raises(LibvirtOperationError, match="is not running"):
        tds.reboot(conn, td_name)


def test_two_processes_racing_for_one_gpu_exactly_one_wins(gpu_host, sim_uri, conn):
    host, gpu = gpu_host
    names = [f"r-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    env = {**os.environ, "LIBVIRT_DEFAULT_URI": sim_uri, "TDXVIRT_HOST_ROOT": str(host.base)}
    procs = [subprocess.Popen([SCRIPT, "define", n, "--gpu", gpu], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for n in names]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    try:
        assert sorted(code for code, _ in results) == [0, 2]
        loser = next(err for code, err in results if code == 2)
        assert "is already given to domain" in loser and len(loser.splitlines()) == 1
        holders = [n for n in names if n in [d.name() for d in conn.listAllDomains(0)]]
        assert len(holders) == 1
    finally:
        for name in names:
            try:
                tds.undefine(conn, name)
            except Exception:
                pass


def test_lock_of_a_killed_process_does_not_block(tmp_path, monkeypatch):
    monkeypatch.setenv("TDXVIRT_STATE_DIR", str(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from tdxvirt import locks\n"
        "with locks.held(['pci-0000:38:00.0']):\n"
        "    print('held', flush=True); time.sleep(60)")],
        env={**os.environ, "TDXVIRT_STATE_DIR": str(tmp_path)}, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(DeviceBusyError, match="another tdxvirt"):
        with locks.held(["pci-0000:38:00.0"], timeout=0.3):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    started = time.monotonic()
    with locks.held(["pci-0000:38:00.0"], timeout=5):
        assert time.monotonic() - started < 1


@pytest.fixture
def standin_tool(tmp_path, monkeypatch):
    """NVIDIA's tool replaced by the stand-in that prints its real output format."""
    from gpu_fakes import STANDIN, StandinTool

    def make(host):
        tool = StandinTool(host, tmp_path / "tool")
        for key, value in tool.env.items():
            monkeypatch.setenv(key, value)
        return tool

    (tmp_path / "tool").mkdir()
    return make, str(STANDIN)


def test_preflight_reads_cc_mode_with_nvidias_tool(conn, gpu_host, td_name, standin_tool):
    from tdxvirt.gpu.modes import mode_reader

    host, gpu = gpu_host
    make, script = standin_tool
    tool = make(host)
    tds.define_td(conn, host, TDSpec.from_user(name=td_name, gpus=[gpu]))
    tool.set_state(**{gpu: {"cc": "off", "ppcie": "off"}})
    with pytest.raises(HostNotReadyError, match=f"GPU {gpu} has CC mode off; a TD needs it on"):
        tds.start(conn, host, td_name, read_modes=mode_reader(host, script))
    assert any("--query-cc-mode" in run for run in tool.runs())
    assert all("--gpu-name" not in run for run in tool.runs())  # by address, never by name
    tool.update(gpu, cc="on")
    assert tds.start(conn, host, td_name, read_modes=mode_reader(host, script)) is True


def test_preflight_wants_cc_off_for_a_plain_vm(conn, gpu_host, td_name, standin_tool):
    from tdxvirt.gpu.modes import mode_reader

    host, gpu = gpu_host
    make, script = standin_tool
    make(host).set_state(**{gpu: {"cc": "on", "ppcie": "off"}})
    tds.define_td(conn, host, TDSpec.from_user(name=td_name, gpus=[gpu], tdx=False))
    with pytest.raises(HostNotReadyError, match="a VM without TDX needs it off"):
        tds.start(conn, host, td_name, read_modes=mode_reader(host, script))


def test_no_tool_means_modes_are_not_checked(monkeypatch):
    from tdxvirt.gpu.modes import mode_reader
    from tdxvirt.host import HostRoot

    monkeypatch.delenv("TDXVIRT_GPU_TOOLS", raising=False)
    assert mode_reader(HostRoot("/"), "/nonexistent/nvidia_gpu_tools.py") is None


def test_real_tool_is_never_run_below_a_fake_root(host_root, monkeypatch):
    """NVIDIA's real tool reads real devices; below a fake root only a named one runs."""
    from tdxvirt.errors import HostNotReadyError as NotReady
    from tdxvirt.gpu.admin_tool import locate
    from tdxvirt.gpu.modes import mode_reader

    monkeypatch.delenv("TDXVIRT_GPU_TOOLS", raising=False)
    assert mode_reader(host_root) is None
    with pytest.raises(NotReady, match="not the host root"):
        locate(None, host_root)


def test_host_check_reads_cc_mode_through_the_named_tool(gpu_host, standin_tool, monkeypatch):
    from tdxvirt.doctor import gpus
    from tdxvirt.doctor.context import Context

    host, gpu = gpu_host
    make, script = standin_tool
    tool = make(host)
    monkeypatch.setenv("TDXVIRT_GPU_TOOLS", script)
    tool.set_state(**{gpu: {"cc": "off", "ppcie": "off"}})
    row = {c.name: c for c in gpus.checks(Context(host))}[f"gpu {gpu}: cc mode"]
    assert (row.status, row.found) == ("warn", "CC off: a TD needs it on (fine for a VM without TDX)")
    tool.update(gpu, cc="on")
    row = {c.name: c for c in gpus.checks(Context(host))}[f"gpu {gpu}: cc mode"]
    assert (row.status, row.found) == ("ok", "CC on")
