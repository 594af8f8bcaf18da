"""Faults injected into real processes (issue 8); each test states what must hold."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tdxvirt.domain.spec import TDSpec
from tdxvirt.errors import TdxvirtError
from tdxvirt.lifecycle import tds

RELAY = Path(__file__).parent / "standins/socket_relay.py"
SCRIPT = os.path.join(os.path.dirname(sys.executable), "tdxvirt")


@pytest.fixture
def relay(sim, tmp_path):
    """A socket in front of the real daemon's that the test can kill like a daemon."""
    path = tmp_path / "relay.sock"
    process = subprocess.Popen([sys.executable, str(RELAY), str(path), str(sim.socket)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    yield process, f"test+unix:///default?socket={path}"
    process.kill()
    process.wait()


def test_daemon_lost_during_define_leaves_nothing_and_a_rerun_works(relay, conn, gpu_host, td_name):
    """Holds: one clear error, no domain defined, and the same define then succeeds."""
    from tdxvirt.virt.conn import open_connection

    process, uri = relay
    host, gpu = gpu_host
    through_relay = open_connection(uri)
    process.send_signal(signal.SIGKILL)  # the "daemon" dies before define's first call
    process.wait()
    with pytest.raises(TdxvirtError) as error:
        tds.define_td(through_relay, host, TDSpec.from_user(name=td_name, gpus=[gpu]))
    assert "\n" not in str(error.value)
    assert td_name not in [d.name() for d in conn.listAllDomains(0)]
    tds.define_td(conn, host, TDSpec.from_user(name=td_name, gpus=[gpu]))
    assert conn.lookupByName(td_name)


def test_daemon_lost_while_stop_waits_is_one_line_exit_1(relay, qemu_conn, sim, tmp_path):
    """Holds: the CLI prints one error line naming the lost connection, exit 1, no traceback."""
    from tdxvirt.host import HostRoot

    process, _ = relay
    qemu_relay_uri = f"qemu+unix:///system?socket={tmp_path / 'relay.sock'}"
    name = f"p-{uuid.uuid4().hex[:10]}"
    tds.define_td(qemu_conn, HostRoot(sim.chroot), TDSpec.from_user(
        name=name, tdx=False, virt_type="qemu", memory="256M", vcpus=1))
    try:
        tds.start(qemu_conn, HostRoot(sim.chroot), name)
        stopper = subprocess.Popen([SCRIPT, "-c", qemu_relay_uri, "stop", name, "--timeout", "30"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2)  # OVMF ignores ACPI: stop is waiting
        process.send_signal(signal.SIGKILL)
        _, stderr = stopper.communicate(timeout=30)
        assert stopper.returncode == 1
        assert len(stderr.splitlines()) == 1 and "Traceback" not in stderr
        assert stderr.startswith("tdxvirt: error: ") and "connection" in stderr
        assert qemu_conn.lookupByName(name).isActive()  # the real daemon still has it
    finally:
        domain = qemu_conn.lookupByName(name)
        if domain.isActive():
            domain.destroy()
        domain.undefineFlags(tds.UNDEFINE_NVRAM)


KILL_WRITER = """
import sys
from pathlib import Path
from tdxvirt.hostcfg.files import atomic_write
path, a, b = Path(sys.argv[1]), sys.argv[2].encode() * 20000, sys.argv[3].encode() * 20000
print("ready", flush=True)
while True:
    atomic_write(path, a)
    atomic_write(path, b)
"""


def test_sigkill_while_writing_a_config_file_leaves_old_or_new(tmp_path):
    """Holds: after SIGKILL at 25 random moments, the file is always one whole version."""
    target = tmp_path / "qemu.conf"
    old, new = b"A" * 20000, b"B" * 20000
    target.write_bytes(old)
    for _ in range(25):
        writer = subprocess.Popen([sys.executable, "-c", KILL_WRITER, str(target), "A", "B"],
                                  stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(0.01 + (uuid.uuid4().int % 50) / 1000)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        assert target.read_bytes() in (old, new)


def test_two_processes_racing_for_one_name_exactly_one_wins(gpu_host, sim_uri, conn, tmp_path):
    """Holds: one define succeeds, the other says the name exists; one domain results."""
    from tdxvirt.sim.hostroot import FakePciDevice, build_host_root

    name = f"race-{uuid.uuid4().hex[:8]}"
    prefix = f"{uuid.uuid4().int % 0xE000 + 0x1000:04x}"
    host = build_host_root(tmp_path / "r", devices=(FakePciDevice(f"{prefix}:38:00.0"),
                                                    FakePciDevice(f"{prefix}:39:00.0", iommu_group=43)))
    env = {**os.environ, "LIBVIRT_DEFAULT_URI": sim_uri, "TDXVIRT_HOST_ROOT": str(host.base)}
    procs = [subprocess.Popen([SCRIPT, "define", name, "--gpu", f"{prefix}:{bus}:00.0"], env=env,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for bus in ("38", "39")]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    try:
        assert sorted(code for code, _ in results) == [0, 2]
        assert "already exists" in next(err for code, err in results if code == 2)
        assert [d.name() for d in conn.listAllDomains(0)].count(name) == 1
    finally:
        tds.undefine(conn, name)
