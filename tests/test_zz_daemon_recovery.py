"""The simulated host survives its daemon dying (run last: it kills a daemon).

libvirtd SIGKILLed while virtlogd lives: before, `sim up` deleted virtlogd's live
socket as stale and failed because virtlogd still ran, and every later start failed
until `sim down && sim up`. Now libvirtd is started again inside the namespaces that
virtlogd keeps alive. Done on the libvirt 11.x root, so the TDX host's daemon that the
other tests' connections use is left alone; the code is the same for both.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

from tdxvirt.sim import chroot, control
from tdxvirt.virt.conn import open_connection

VM = ("<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
      "<os><type arch='x86_64' machine='q35'>hvm</type></os><devices>"
      "<controller type='usb' model='none'/><memballoon model='none'/></devices></domain>")


def _define(uri: str, name: str):
    conn = open_connection(uri)
    return conn, conn.defineXML(VM.format(name=name))


def test_a_killed_libvirtd_starts_again_in_its_namespaces_and_sim_down_stops_guests(sim):
    root = sim.legacy_chroot
    virtlogd = chroot.alive_pid(root / "run/virtlogd.pid")
    libvirtd = chroot.alive_pid(root / "run/libvirtd.pid")
    assert virtlogd and libvirtd
    name = f"rec-{uuid.uuid4().hex[:6]}"
    conn, domain = _define(sim.legacy_qemu_uri, name)
    conn.close()
    os.kill(libvirtd, signal.SIGKILL)
    for _ in range(100):
        if chroot.alive_pid(root / "run/libvirtd.pid") is None:
            break
        time.sleep(0.05)
    assert not chroot.socket_answers(sim.legacy_socket)
    assert "libvirt 11.x host" in control.up()
    assert chroot.alive_pid(root / "run/virtlogd.pid") == virtlogd  # the same virtlogd
    conn = open_connection(sim.legacy_qemu_uri)
    try:
        domain = conn.lookupByName(name)
        domain.create()  # QEMU's log goes through the surviving virtlogd
        assert domain.isActive()
        assert control.stop_guests(sim.legacy_qemu_uri, sim.legacy_socket) == [name]
        assert not domain.isActive()
    finally:
        if domain.isActive():
            domain.destroy()
        domain.undefine()
        conn.close()


def test_both_daemons_gone_make_new_namespaces_where_libvirt_autostarts_the_network(sim):
    """libvirtd and virtlogd both gone but /run kept (not `sim down`): new namespaces, a
    boot of the emulated host's network. libvirt's network driver must autostart
    'default' by itself there (tdxvirt's own fallback in `sim up` is bypassed: the
    daemons are started directly), or its once-per-boot mark from the old namespaces
    leaves every TD with a NIC unable to start. The TDX host's daemons this time: their
    network is the one TDs use; the keeper of the test driver is started again."""
    from tdxvirt.sim import keeper

    old_virtlogd = chroot.alive_pid(sim.chroot / "run/virtlogd.pid")
    keeper.stop(sim.keeper_pidfile)
    assert set(chroot.stop_daemons(sim.chroot)) == {"libvirtd", "virtlogd"}
    assert (sim.chroot / chroot.NETWORK_AUTOSTARTED).exists()  # the old boot's mark
    try:
        assert chroot.start_daemons(sim.chroot, sim.socket, sim.devices)
        assert chroot.alive_pid(sim.chroot / "run/virtlogd.pid") != old_virtlogd
        conn = open_connection(sim.qemu_uri)
        try:
            assert conn.networkLookupByName("default").isActive()
        finally:
            conn.close()
    finally:
        control.up(sim)  # the keeper too
