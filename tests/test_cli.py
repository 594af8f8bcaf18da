"""The command line: click's runner against the real daemon, and one real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from tdxvirt.cli import main


def _domain_names(conn):
    return sorted(d.name() for d in conn.listAllDomains(0))


def test_define_start_list_stop_undefine(run, gpu_host, td_name, conn):
    _, gpu = gpu_host
    result = run("define", td_name, "--gpu", gpu, "--memory", "8G", "--vcpus", "2")
    assert result.exit_code == 0, result.stderr
    assert f"Defined TD '{td_name}'" in result.stdout
    assert f"GPU {gpu}: managed hostdev, iommufd, root port 1" in result.stdout
    assert run("start", td_name).stdout.strip() == f"Started '{td_name}'"
    assert "already running" in run("start", td_name).stdout
    records = {r["name"]: r for r in json.loads(run("list", "--json").stdout)}
    uptime = records[td_name].pop("uptime_s")
    assert records[td_name] == {"name": td_name, "state": "running", "type": "TDX", "tdx": True,
                                "dialect": "native", "managed_by_tdxvirt": True, "vcpus": 2,
                                "memory_mib": 8192, "gpus": [gpu], "problems": [],
                                "weakened": False}
    assert 0 <= uptime < 60  # tdxvirt recorded the start in live metadata
    table = run("list").stdout
    assert table.splitlines()[0].split()[:3] == ["NAME", "STATE", "TYPE"]
    assert any(line.split()[:3] == [td_name, "running", "TDX"] for line in table.splitlines())
    assert run("stop", td_name).stdout.strip() == f"'{td_name}' is shut off"
    assert run("undefine", td_name).exit_code == 0
    assert td_name not in _domain_names(conn)


def test_print_xml_defines_nothing(run, gpu_host, td_name, conn):
    _, gpu = gpu_host
    result = run("define", td_name, "--gpu", gpu, "--print-xml")
    assert result.exit_code == 0
    assert result.stdout.startswith("<domain type='kvm'")
    assert "<launchSecurity type='tdx'>" in result.stdout
    assert td_name not in _domain_names(conn)


def test_unaligned_memory_warns_on_stderr(run, gpu_host, td_name):
    _, gpu = gpu_host
    result = run("define", td_name, "--gpu", gpu, "--memory", "1025M")
    assert result.exit_code == 0
    assert result.stderr.startswith("tdxvirt: warning: memory")
    assert "1026 MiB" in result.stdout


BAD_DEFINES = [
    (["--gpu", "zz:00.0"], "invalid PCI address 'zz:00.0'"),
    (["--gpu", "{gpu}", "--gpu", "{gpu}"], "is given twice"),
    (["--gpu", "39:00.0"], "no PCI device 0000:39:00.0"),
    (["a/b", "--gpu", "{gpu}"], "invalid TD name 'a/b'"),
    (["a<b", "--gpu", "{gpu}"], "invalid TD name 'a<b'"),
    (["--gpu", "{gpu}", "--memory", "0"], "invalid --memory '0'"),
    (["--gpu", "{gpu}", "--memory", "12XB"], "invalid --memory '12XB'"),
    (["--gpu", "{gpu}", "--vcpus", "0"], "invalid --vcpus 0"),
    (["--gpu", "{gpu}", "--vcpus", "many"], "'many' is not a valid integer"),
    (["--gpu", "{gpu}", "--image", "/nonexistent/disk.qcow2"], "no such file"),
    (["--gpu", "{gpu}", "--ovmf", "/nonexistent/OVMF.fd"], "no such file"),
    ([], "give the TD a NAME"),
    (["--gpu", "{gpu}", "--policy", "0x2"], "only bit 0"),
    (["--gpu", "{gpu}", "--policy", "zz"], "invalid --policy 'zz'"),
    (["--gpu", "{gpu}", "--mr-owner", "abc"], "invalid --mr-owner"),
    (["--gpu", "{gpu}", "--mr-config-id", "AAAA"], "decodes to 3 bytes"),
    (["--gpu", "{gpu}", "--qgs", "relative.sock"], "invalid --qgs"),
    (["--gpu", "{gpu}", "--qgs", "vsock:2:4050"], "only takes a unix socket path"),
    (["--gpu", "{gpu}", "--dialect", "xen"], "'xen' is not one of"),
    (["--gpu", "{gpu}", "--hugepages", "4K"], "'4K' is not one of"),
    (["--gpu", "{gpu}", "--no-tdx", "--debug"], "make no sense with --no-tdx"),
    (["--gpu", "{gpu}", "--initrd", "/etc/hostname"], "need --kernel"),
    (["--gpu", "{gpu}", "--ssh-port", "70000"], "invalid --ssh-port"),
    (["--gpu", "{gpu}", "--ppcie"], "no NVSwitch found"),
]


@pytest.mark.parametrize("args, message", BAD_DEFINES)
def test_bad_define_is_one_line_exit_2_nothing_defined(run, gpu_host, conn, args, message):
    _, gpu = gpu_host
    before = _domain_names(conn)
    result = run("define", *[a.format(gpu=gpu) for a in args])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdxvirt: error: ") and message in lines[0]
    assert _domain_names(conn) == before


def test_existing_name_is_exit_2(run, gpu_host, td_name, conn):
    _, gpu = gpu_host
    assert run("define", td_name, "--gpu", gpu).exit_code == 0
    before = conn.lookupByName(td_name).XMLDesc(0)
    result = run("define", td_name, "--gpu", gpu, "--vcpus", "7")
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert conn.lookupByName(td_name).XMLDesc(0) == before


@pytest.mark.parametrize("command", ["start", "stop", "destroy", "undefine"])
def test_unknown_domain_is_exit_2(run, command):
    result = run(command, "no-such-td")
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("tdxvirt: error: no domain named 'no-such-td'")


def test_unreachable_uri_is_exit_1_and_names_the_uri(tmp_path):
    uri = f"test+unix:///default?socket={tmp_path}/nowhere.sock"
    result = CliRunner().invoke(main, ["-c", uri, "list"])
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 1
    assert f"cannot connect to libvirt at {uri}" in result.stderr


def test_uri_resolution_follows_virsh(monkeypatch):
    from tdxvirt.virt.conn import resolve_uri

    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    assert resolve_uri(None) == "qemu:///system"
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "test:///default")
    assert resolve_uri(None) == "test:///default"
    assert resolve_uri("qemu+ssh://h/system") == "qemu+ssh://h/system"


def test_real_subprocess_uses_env_options(gpu_host, sim_uri, td_name, conn):
    """The installed console script, with LIBVIRT_DEFAULT_URI and TDXVIRT_HOST_ROOT."""
    host, gpu = gpu_host
    env = {**os.environ, "LIBVIRT_DEFAULT_URI": sim_uri, "TDXVIRT_HOST_ROOT": str(host.base)}
    script = os.path.join(os.path.dirname(sys.executable), "tdxvirt")
    done = subprocess.run([script, "define", td_name, "--gpu", gpu], env=env,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert td_name in _domain_names(conn)
    bad = subprocess.run([script, "define", "--gpu", "zz"], env=env, capture_output=True,
                         text=True, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.splitlines()) == 1


def test_help_and_version():
    assert CliRunner().invoke(main, ["--help"]).exit_code == 0
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and "0.1.0" in result.stdout
