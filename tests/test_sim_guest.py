"""A TD on the emulated TDX host boots a real guest from a disk, through the chain a
Debian TD boots through on Debian's TDX firmware (Secure Boot with Microsoft's keys:
shim, GRUB, kernel, each signed), gets an address from the host's 'default' network,
is reached through its guest agent, and stops when asked (`tdxvirt sim guest-image`,
tdxvirt/sim/guest.py). Under TCG, without tdx-guest: the guest is no TD, and says so."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
from conftest import TDXVIRT, run_sim

from tdxvirt.guest.verify import GuestExec, LibvirtAgentChannel

pytestmark = pytest.mark.usefixtures("cc_on")
BOOT_SECONDS = 240  # TCG on two cores: usually 20-40 s from OVMF to qemu-ga


@pytest.fixture(scope="module")
def guest_image():
    # below /tmp (the simulated host shares it) in a directory QEMU's user may enter:
    # pytest's own are root's alone, and QEMU opens the base image as libvirt-qemu
    directory = Path(tempfile.mkdtemp(prefix="tdxvirt-sim-guest-", dir="/tmp"))
    directory.chmod(0o755)
    image = directory / "guest.qcow2"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / "key")],
                   check=True)
    built = subprocess.run([TDXVIRT, "sim", "guest-image", str(image), "--ssh-key",
                            str(directory / "key.pub")], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    assert "Wrote" in built.stdout and image.is_file()
    again = subprocess.run([TDXVIRT, "sim", "guest-image", str(image)], capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 2 and "already exists" in again.stderr  # never overwritten
    image.chmod(0o644)
    yield image, directory / "key"
    shutil.rmtree(directory)


def _addresses(uri: str, name: str, source: str) -> set[str]:
    listed = subprocess.run(["virsh", "-c", uri, "domifaddr", name, "--source", source],
                            capture_output=True, text=True, check=True).stdout
    return {word.split("/")[0] for line in listed.splitlines() for word in line.split()
            if word.startswith("192.168.")}


def _console(conn, name: str, typed: bytes, seconds: float = 5) -> str:
    """What the serial console shows after ``typed`` (libvirt's console stream, as
    `virsh console` and `tdxvirt console` use it)."""
    import threading
    import time

    import libvirt

    stream = conn.newStream(0)
    conn.lookupByName(name).openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
    seen = bytearray()

    def read():
        while True:
            try:
                data = stream.recv(4096)
            except libvirt.libvirtError:  # aborted below, once enough was seen
                return
            if not isinstance(data, bytes) or not data:
                return
            seen.extend(data)

    threading.Thread(target=read, daemon=True).start()
    time.sleep(0.5)
    stream.send(typed)
    time.sleep(seconds)
    try:
        stream.abort()
    except libvirt.libvirtError:
        pass
    return seen.decode(errors="replace")


def test_a_td_boots_the_guest_disk_and_is_reached_then_stops(qemu_conn, guest_image):
    guest_image, key = guest_image
    name = f"guest-{uuid.uuid4().hex[:8]}"
    base_digest = hashlib.sha256(guest_image.read_bytes()).hexdigest()
    defined = run_sim("define", name, "--gpu", "38:00.0", "--allow-shared", "--memory", "1G",
                      "--vcpus", "1", "--image", str(guest_image), "--image-format", "qcow2")
    assert defined.returncode == 0, defined.stderr
    overlay = next(line.split()[1] for line in defined.stdout.splitlines()
                   if line.strip().startswith("disk "))
    try:
        assert run_sim("start", name).returncode == 0
        verified = subprocess.run([TDXVIRT, "--sim", "guest", "verify", name, "--wait",
                                   str(BOOT_SECONDS), "--json"], capture_output=True, text=True,
                                  timeout=BOOT_SECONDS + 120)
        # the guest answers, and says the truth under TCG: no TDX (exit 1), but the
        # kernel command line GRUB gave it
        assert verified.returncode == 1, verified.stderr
        checks = {c["check"]: c["ok"] for c in json.loads(verified.stdout)["checks"]}
        assert checks["kernel argument clearcpuid=mtrr"] is True
        assert checks["TDX guest device"] is False

        domain = qemu_conn.lookupByName(name)
        agent = GuestExec(LibvirtAgentChannel(domain, uri=qemu_conn.getURI()), timeout=30)
        booted = agent.run(["dmesg"]).stdout
        assert "Secure boot enabled" in booted  # the firmware enforced it on shim, GRUB, kernel
        assert "Debian Secure Boot CA" in booted

        uri = qemu_conn.getURI()
        leased = _addresses(uri, name, "lease")
        assert leased and leased == _addresses(uri, name, "agent")  # the guest has its lease
        assert all(ipaddress.ip_address(a) in ipaddress.ip_network("192.168.122.0/24")
                   for a in leased)

        # root logs in: over ssh with the key the image was built with, from the
        # simulated host's network (sim exec), and on the serial console
        [address] = leased
        login = subprocess.run(
            [TDXVIRT, "sim", "exec", "--", "ssh", "-i", str(key), "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             f"root@{address}", "cat", "/proc/cmdline"], capture_output=True, text=True, timeout=60)
        assert login.returncode == 0 and "clearcpuid=mtrr" in login.stdout, login.stderr
        # the shell evaluates what is typed: only it can print 42
        assert "CONSOLE-42" in _console(qemu_conn, name, b"\necho CONSOLE-$((6*7))\n")

        stopped = run_sim("stop", name, "--timeout", "60")  # the guest obeys the request
        assert stopped.returncode == 0, stopped.stderr
        assert not domain.isActive()
    finally:
        run_sim("destroy", name)
        undefined = run_sim("undefine", name, "--remove-storage")
        assert undefined.returncode == 0, undefined.stderr
    assert not subprocess.run(["test", "-e", overlay]).returncode == 0  # the overlay went
    assert hashlib.sha256(guest_image.read_bytes()).hexdigest() == base_digest  # base untouched


def test_a_base_image_qemu_cannot_reach_is_said_at_define(qemu_conn):
    """libvirt gives QEMU the image files it opens, not the directories above them: a base
    image in a directory only root may enter fails at start with libvirt's 'Permission
    denied'; define says so first, with the fix (found with pytest's own 0700 dirs)."""
    directory = Path(tempfile.mkdtemp(prefix="tdxvirt-closed-", dir="/tmp"))  # 0700
    image = directory / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    name = f"closed-{uuid.uuid4().hex[:8]}"
    try:
        for mode, warned in ((0o700, True), (0o755, False)):
            directory.chmod(mode)
            defined = run_sim("define", name, "--gpu", "38:00.0", "--allow-shared", "--memory", "1G",
                              "--image", str(image), "--image-format", "qcow2")
            assert defined.returncode == 0, defined.stderr
            assert (f"cannot enter {directory}" in defined.stderr) is warned, defined.stderr
            assert f"`chmod o+x {directory}`" in defined.stderr or not warned
            assert run_sim("undefine", name, "--remove-storage").returncode == 0
    finally:
        run_sim("undefine", name, "--remove-storage")
        shutil.rmtree(directory)
