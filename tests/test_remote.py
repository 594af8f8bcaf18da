"""`-c` with an ssh URI: everything that goes through libvirt works on a remote host,
and checks that read this machine's files are skipped (issues 4 and 5).

The "remote host" is this machine reached through a real sshd on 127.0.0.1, with
libvirt's own ssh transport (netcat to the daemon's socket on the far side).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest
from click.testing import CliRunner

from tdxvirt.cli import main

SCRIPT = os.path.join(os.path.dirname(sys.executable), "tdxvirt")

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/sbin/sshd") or not shutil.which("nc"),
                                reason="openssh-server and netcat-openbsd (scripts/setup installs them)")


@pytest.fixture(scope="module")
def ssh_uri(tmp_path_factory, sim):
    """test+ssh://root@127.0.0.1:PORT/default for the simulated host's daemon."""
    work = tmp_path_factory.mktemp("sshd")
    for key in ("hostkey", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / key)],
                       check=True)
    port = 20000 + uuid.uuid4().int % 20000
    (work / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {work / 'hostkey'}",
        f"PidFile {work / 'sshd.pid'}", f"AuthorizedKeysFile {work / 'client.pub'}",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no", "UsePAM no",
        "StrictModes no", ""]))
    os.makedirs("/run/sshd", exist_ok=True)
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(work / "sshd_config"),
                             "-E", str(work / "sshd.log")])
    deadline = time.monotonic() + 10
    while subprocess.run(["nc", "-z", "127.0.0.1", str(port)]).returncode != 0:
        assert time.monotonic() < deadline, (work / "sshd.log").read_text()
        time.sleep(0.1)
    yield (f"test+ssh://root@127.0.0.1:{port}/default?socket={sim.socket}"
           f"&keyfile={work / 'client'}&no_verify=1")
    sshd.terminate()
    sshd.wait()


def test_lifecycle_through_ssh(ssh_uri, gpu_host, td_name, conn):
    host, gpu = gpu_host

    def tdxvirt(*args):
        done = subprocess.run([SCRIPT, "-c", ssh_uri, "--host-root", str(host.base), *args],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert f"Defined TD '{td_name}'" in tdxvirt("define", td_name, "--gpu", gpu)
    assert tdxvirt("start", td_name).strip() == f"Started '{td_name}'"
    assert conn.lookupByName(td_name).isActive()  # the same daemon, seen locally
    listed = {r["name"]: r for r in json.loads(tdxvirt("list", "--json"))}
    assert listed[td_name]["state"] == "running" and listed[td_name]["gpus"] == [gpu]
    assert json.loads(tdxvirt("show", td_name, "--json"))["dialect"] == "native"
    tdxvirt("destroy", td_name)
    tdxvirt("undefine", td_name)
    assert td_name not in [d.name() for d in conn.listAllDomains(0)]


def test_remote_define_refuses_files_it_would_create_here(ssh_uri, gpu_host, td_name, tmp_path):
    host, gpu = gpu_host
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    result = CliRunner().invoke(main, ["-c", ssh_uri, "--host-root", str(host.base), "define",
                                       td_name, "--gpu", gpu, "--image", str(base)])
    assert result.exit_code == 2 and "URI is remote" in result.stderr


def test_host_check_through_ssh_skips_this_machines_files(ssh_uri, host_root):
    result = CliRunner().invoke(main, ["-c", ssh_uri, "--host-root", str(host_root.base),
                                       "host", "check", "--json"])
    report = json.loads(result.stdout)
    assert report["uri"] == ssh_uri
    rows = {r["name"]: r for r in report["checks"]}
    skipped = [name for name, r in rows.items()
               if r["status"] == "skip" and "remote host" in r["found"]]
    assert "cpu: TDX" in skipped and "vfio" in skipped
    assert rows["libvirt: connection"]["status"] == "ok"
    assert rows["libvirt: dialect"]["status"] == "ok"
