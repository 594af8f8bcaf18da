"""`-c` with an ssh URI: everything that goes through libvirt works on a remote host,
and nothing of this machine is read for it (issues 4, 5 and 15).

The "remote host" is the simulated host's daemon reached through a real sshd on
127.0.0.1, with libvirt's own ssh transport (netcat to the daemon's socket on the far
side). The host root given is one with no GPU at all: the remote host's facts come
from its libvirt (tests/test_remote_facts.py covers GPUs, firmware, disks and locks).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from remote_hosts import Sshd, available

from tdxvirt.cli import main
from tdxvirt.sim.hostroot import build_host_root

SCRIPT = os.path.join(os.path.dirname(sys.executable), "tdxvirt")

pytestmark = pytest.mark.skipif(not available(),
                                reason="openssh-server and netcat-openbsd (scripts/setup installs them)")


@pytest.fixture(scope="module")
def ssh_uri(tmp_path_factory, sim):
    """test+ssh://root@127.0.0.1:PORT/default for the simulated host's daemon."""
    sshd = Sshd(tmp_path_factory.mktemp("sshd"))
    yield sshd.uri("test", "/default", sim.socket)
    sshd.stop()


@pytest.fixture
def gpu_less_root(tmp_path):
    """This machine's host root, with no GPU: a remote command must never need one."""
    return build_host_root(tmp_path / "no-gpu", devices=())


def test_lifecycle_through_ssh(ssh_uri, gpu_less_root, td_name, conn):
    def tdxvirt(*args):
        done = subprocess.run([SCRIPT, "-c", ssh_uri, "--host-root", str(gpu_less_root.base), *args],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    defined = tdxvirt("define", td_name, "--memory", "2G")
    assert f"Defined TD '{td_name}'" in defined
    assert "TDX firmware chosen by libvirt on the host" in defined  # no file of this machine
    assert tdxvirt("start", td_name).strip() == f"Started '{td_name}'"
    assert conn.lookupByName(td_name).isActive()  # the same daemon, seen locally
    listed = {r["name"]: r for r in json.loads(tdxvirt("list", "--json"))}
    assert listed[td_name]["state"] == "running" and listed[td_name]["gpus"] == []
    shown = json.loads(tdxvirt("show", td_name, "--json"))
    assert shown["dialect"] == "native"
    # no file of this machine stands for the remote host's firmware: unknown here
    assert shown["recorded_files"] == [] and shown["recorded_files_note"].startswith("unknown here")
    tdxvirt("destroy", td_name)
    tdxvirt("undefine", td_name)
    assert td_name not in [d.name() for d in conn.listAllDomains(0)]


def test_remote_define_refuses_files_it_would_create_here(ssh_uri, gpu_less_root, td_name, tmp_path):
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    result = CliRunner().invoke(main, ["-c", ssh_uri, "--host-root", str(gpu_less_root.base),
                                       "define", td_name, "--gpu", "38:00.0", "--image", str(base)])
    assert result.exit_code == 2 and "URI is remote" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_host_check_through_ssh_skips_this_machines_files(ssh_uri, gpu_less_root):
    result = CliRunner().invoke(main, ["-c", ssh_uri, "--host-root", str(gpu_less_root.base),
                                       "host", "check", "--json"])
    report = json.loads(result.stdout)
    assert report["uri"] == ssh_uri
    rows = {r["name"]: r for r in report["checks"]}
    skipped = [name for name, r in rows.items()
               if r["status"] == "skip" and "remote host" in r["found"]]
    assert "cpu: TDX" in skipped and "vfio" in skipped
    assert rows["libvirt: connection"]["status"] == "ok"
    assert rows["libvirt: dialect"]["status"] == "ok"
