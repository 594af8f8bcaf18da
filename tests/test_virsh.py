"""virsh on the same URI sees and drives what tdxvirt defines, and the other way round."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from lxml import etree

from tdxvirt.domain.spec import TDSpec
from tdxvirt.lifecycle import tds

pytestmark = pytest.mark.skipif(shutil.which("virsh") is None, reason="virsh not installed")


def virsh(uri, *args):
    done = subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_virsh_dumpxml_shows_what_tdxvirt_rendered(conn, sim_uri, gpu_host, td_name):
    host, gpu = gpu_host
    td = tds.define_td(conn, host, TDSpec.from_user(name=td_name, gpus=[gpu]))
    dumped = etree.fromstring(virsh(sim_uri, "dumpxml", td_name).encode())
    rendered = etree.fromstring(td.xml.encode())
    for path in ("launchSecurity", "devices/hostdev", "os/loader"):
        # Exclusive c14n: namespaces declared on <domain> but unused here do not count.
        assert etree.tostring(dumped.find(path), method="c14n", exclusive=True) == etree.tostring(
            rendered.find(path), method="c14n", exclusive=True), path


def test_virsh_drives_a_tdxvirt_td(conn, sim_uri, gpu_host, td_name):
    host, gpu = gpu_host
    tds.define_td(conn, host, TDSpec.from_user(name=td_name, gpus=[gpu]))
    assert td_name in virsh(sim_uri, "list", "--all", "--name").split()
    virsh(sim_uri, "start", td_name)
    assert {r.facts.name: r.state for r in tds.list_tds(conn)}[td_name] == "running"
    virsh(sim_uri, "destroy", td_name)
    assert {r.facts.name: r.state for r in tds.list_tds(conn)}[td_name] == "shut off"
    virsh(sim_uri, "undefine", td_name)
    assert td_name not in [r.facts.name for r in tds.list_tds(conn)]


def test_td_redefined_by_virsh_is_still_recognised(conn, sim_uri, gpu_host, td_name, tmp_path):
    host, gpu = gpu_host
    tds.define_td(conn, host, TDSpec.from_user(name=td_name, gpus=[gpu], memory="8G"))
    edited = tmp_path / "edited.xml"  # what `virsh edit` does: dumpxml, change, define
    edited.write_text(virsh(sim_uri, "dumpxml", "--inactive", td_name).replace("<memory unit='KiB'>8388608</memory>",
                                     "<memory unit='KiB'>16777216</memory>")
                      .replace("<currentMemory unit='KiB'>8388608</currentMemory>", ""))
    virsh(sim_uri, "define", "--validate", str(edited))
    row = {r.facts.name: r for r in tds.list_tds(conn)}[td_name]
    assert row.facts.managed_by_tdxvirt and row.facts.memory_kib == 16777216
