"""virt-manager's Run, Save then Run, and Clone on the emulated TDX host, clicked through
its accessibility tree (tests/virt_manager_gui.py) on an Xvfb display: libvirt's qemu
hook refuses each weakened start with tdxvirt's line, shown in virt-manager's error
dialog; the repaired TD starts from the same Run button; a TD is recognisable by its
title in the main list."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_enforce import virsh
from test_integrity import run, virt_xml

DRIVER = Path(__file__).with_name("virt_manager_gui.py")
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.skipif(
    not (shutil.which("virt-manager") and shutil.which("Xvfb") and shutil.which("dbus-run-session")
         and Path("/usr/lib/python3/dist-packages/dogtail").is_dir()),
    reason="virt-manager, xvfb, dbus and python3-dogtail (scripts/setup installs them)")


@pytest.fixture(scope="module")
def display():
    """A display of its own: Xvfb picks a free number and writes it to a pipe."""
    read, write = os.pipe()
    server = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x1024x24",
                               "-nolisten", "tcp"], pass_fds=(write,),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read) as pipe:
        number = pipe.readline().strip()
    assert number, "Xvfb did not start"
    yield f":{number}"
    server.terminate()
    server.wait(10)


def clicked(display: str, uri: str, *steps) -> list[dict]:
    """Each step done in one virt-manager (a D-Bus session of its own for AT-SPI)."""
    env = {**os.environ, "DISPLAY": display, "NO_AT_BRIDGE": "0"}
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    done = subprocess.run(["dbus-run-session", "--", SYSTEM_PYTHON, str(DRIVER), uri,
                           json.dumps(steps)], capture_output=True, text=True, env=env,
                          timeout=600)
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert not any("failed" in r for r in results), results
    return results


def refused(result: dict, says: str, way_back: str) -> None:
    """virt-manager's error dialog carries the hook's line: the way back in its summary
    (which virt-manager cuts at 512 characters), what changed in its details."""
    error = result["error"]
    assert error and "Hook script execution failed" in error["summary"], result
    summary = " ".join(error["summary"].split())  # virt-manager wraps it at 80 columns
    assert "tdxvirt: " in summary and way_back in summary, error
    assert says in " ".join(error["details"].split()), error


def test_run_of_a_stripped_td_is_refused_then_the_repaired_td_runs(td, sim, display, qemu_conn, cc_on):
    virt_xml(sim, td, "--edit", "--xml", "xpath.delete=./launchSecurity")
    listed, first = clicked(display, sim.qemu_uri, ["row", td], ["run", td])
    assert listed["row"] == f"{td} [TDX]\nShutoff"  # the title names it a TD
    refused(first, "<launchSecurity type='tdx'> was removed", f"tdxvirt repair {td}")
    assert first["row"].endswith("Shutoff") and not qemu_conn.lookupByName(td).isActive()
    assert run("repair", td).returncode == 0
    (again,) = clicked(display, sim.qemu_uri, ["run", td])
    assert again["error"] is None and again["row"].endswith("Running"), again
    virsh(sim, "destroy", td)


def test_save_then_run_is_refused_and_virt_manager_offers_a_fresh_start(td, sim, display,
                                                                         qemu_conn, cc_on):
    """Run restores a saved state: refused; virt-manager then asks whether to remove
    the saved state and start normally, and Yes boots the TD afresh (and measured)."""
    try:
        started, saved, restored = clicked(display, sim.qemu_uri, ["run", td], ["save", td],
                                           ["run", td, "Yes"])
        assert started["error"] is None and saved["error"] is None, (started, saved)
        assert saved["row"].endswith("Saved")
        refused(restored, "never resumed from saved memory", f"virsh managedsave-remove {td}")
        assert restored["error"]["pressed"] == "Yes" and restored["error"]["then"] is None
        assert restored["row"].endswith("Running")
        assert not qemu_conn.lookupByName(td).hasManagedSaveImage()
    finally:
        virsh(sim, "destroy", td)
        virsh(sim, "managedsave-remove", td)


def test_a_clone_made_in_virt_manager_is_refused(td, sim, display, qemu_conn, cc_on):
    clone = f"{td}-clone"
    try:
        made, ran = clicked(display, sim.qemu_uri, ["clone", td], ["run", clone])
        assert made["error"] is None, made
        refused(ran, "copy (clone) of the TD", f"tdxvirt adopt {clone}")
        assert not qemu_conn.lookupByName(clone).isActive()
    finally:
        virsh(sim, "undefine", clone)


def test_virt_managers_library_reads_the_guest_os(td, sim):
    """virtinst (virt-manager's library) finds the OS define declared: libosinfo's generic
    recent Linux, so Add Hardware offers virtio, not SATA and e1000e."""
    code = ("import sys, libvirt; sys.path.insert(0, '/usr/share/virt-manager'); "
            "from virtinst import Guest; "
            "conn = libvirt.open(sys.argv[1]); "
            "guest = Guest(conn, parsexml=conn.lookupByName(sys.argv[2]).XMLDesc(0)); "
            "print(guest.osinfo.name, guest.osinfo.is_generic(), guest.osinfo.supports_virtiodisk())")
    done = subprocess.run([SYSTEM_PYTHON, "-c", code, sim.qemu_uri, td], capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.split() == ["linux2022", "False", "True"], done.stderr
