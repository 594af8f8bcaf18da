"""Issue #18: start's preflight runs NVIDIA's tool on GPUs and NVSwitches only, and lock
files are never opened through a symlink."""

from __future__ import annotations

import os

import pytest
from lxml import etree

from tdxvirt import locks
from tdxvirt.domain.spec import TDSpec
from tdxvirt.errors import TdxvirtError
from tdxvirt.lifecycle import tds
from tdxvirt.sim.hostroot import FakePciDevice, build_host_root

NIC = {"vendor": "0x8086", "device": "0x1592", "class": "0x020000"}  # an Intel E810 NIC


def test_preflight_reads_modes_of_gpus_only_never_of_a_nic(conn, tmp_path, td_name):
    gpu, nic = "e0a1:38:00.0", "e0a1:4b:00.0"
    host = build_host_root(tmp_path / "root", devices=(
        FakePciDevice(gpu), FakePciDevice(nic, overrides=NIC, iommu_group=60)))
    tds.define_td(conn, host, TDSpec.from_user(name=td_name, gpus=[gpu]))
    root = etree.fromstring(conn.lookupByName(td_name).XMLDesc(0).encode())
    devices = root.find("devices")
    devices.append(etree.fromstring(
        "<hostdev mode='subsystem' type='pci' managed='yes'><source>"
        "<address domain='0xe0a1' bus='0x4b' slot='0x00' function='0x0'/></source></hostdev>"))
    conn.defineXML(etree.tostring(root).decode())
    asked = []

    def read_modes(found):
        asked.extend(str(d.address) for d in found)
        return []

    assert tds.start(conn, host, td_name, read_modes=read_modes) is True
    assert asked == [gpu]  # NVIDIA's tool never touches the NIC


def test_a_lock_file_symlink_is_refused_and_never_followed(monkeypatch, tmp_path):
    state = tmp_path / "state"
    (state / "locks").mkdir(parents=True)
    monkeypatch.setenv("TDXVIRT_STATE_DIR", str(state))
    victim = tmp_path / "etc-nologin"  # O_CREAT through the link would create it
    key = locks.name_key("localhost", "td-x")
    os.symlink(victim, locks._lock_path(key))
    with pytest.raises(TdxvirtError, match="is a symlink") as error:
        with locks.held([key], timeout=1):
            pass
    assert "\n" not in str(error.value)
    assert not os.path.lexists(victim)


def test_a_lock_file_that_is_a_fifo_is_refused(monkeypatch, tmp_path):
    state = tmp_path / "state"
    (state / "locks").mkdir(parents=True)
    monkeypatch.setenv("TDXVIRT_STATE_DIR", str(state))
    key = locks.name_key("localhost", "td-y")
    os.mkfifo(locks._lock_path(key))
    with pytest.raises(TdxvirtError, match="not a regular file"):
        with locks.held([key], timeout=1):
            pass


def test_ordinary_locks_still_work(monkeypatch, tmp_path):
    monkeypatch.setenv("TDXVIRT_STATE_DIR", str(tmp_path / "state"))
    with locks.held([locks.name_key("localhost", "td-z"),
                     *locks.gpu_keys("localhost", ["0000:38:00.0"])], timeout=1):
        assert locks._lock_path(locks.name_key("localhost", "td-z")).is_file()
