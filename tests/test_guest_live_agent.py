"""``guest verify`` end to end: a real guest, a real qemu-ga, libvirt's real qemuAgentCommand.

A TD cannot run here, but an ordinary guest can: the simulated host's libvirt 12.x qemu
driver boots (TCG) Debian's own 6.12 kernel with an initramfs holding Debian's busybox
and qemu-ga, all taken out of Debian packages with ``apt-get download`` and
``dpkg-deb -x`` (nothing is installed). verify then runs through the whole real path —
libvirt-qemu, QEMU's virtio-serial channel, qemu-ga's guest-exec — and must report what
is true of that guest: not a TD, no NVIDIA driver, but ``clearcpuid=mtrr`` on its kernel
command line because the domain passes it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import libvirt
import pytest
from test_guest_config import KERNEL_ROLES, _resolve

from tdxvirt.guest.verify import AGENT_CHANNEL_XML, agent_channel_state, verify_domain
from tdxvirt.paths import state_dir
from tdxvirt.sim.guest import AGENT_LOOP
from tdxvirt.sim.guest import newc as _newc  # noqa: F401  (acpi_guest imports it from here)

GUEST_PACKAGES = ("qemu-guest-agent", "busybox-static", "liburing2")
APPLETS = ("sh", "mount", "mkdir", "cat", "stat", "dmesg", "lsmod", "ls", "sleep", "poweroff")
INIT = """#!/bin/sh
export PATH=/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp /var/run
""" + AGENT_LOOP.replace("GUEST", "tdxvirt test guest")  # the simulated host's guest's own loop
BOOT_SECONDS = 90  # TCG on two cores; the agent is usually up within 10 s
# i440fx ('pc'), not q35: with direct kernel boot under TCG, a virtio device behind q35's
# pcie-root-port stays in D3cold ("device inaccessible") and the agent port never appears.


def _download(packages, directory: Path) -> list[Path]:
    subprocess.run(["apt-get", "download", "-q", *packages], cwd=directory, check=True, capture_output=True)
    return sorted(directory.glob("*.deb"))


def _shared_libraries(binary: Path, extra_lib_dir: Path) -> list[str]:
    """The libraries (and loader) ``binary`` needs, as ldd resolves them."""
    env = {**os.environ, "LD_LIBRARY_PATH": str(extra_lib_dir)}
    output = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True, env=env).stdout
    assert "not found" not in output, output
    return re.findall(r"(?:=>\s*)?(/\S+)\s+\(0x", output)


def unpack_with_kernel(packages, scratch: Path) -> tuple[Path, Path]:
    """(root, vmlinuz): the packages and Debian's newest kernel image unpacked below scratch."""
    kernel_package = next(filter(None, map(_resolve, KERNEL_ROLES["newest"])))
    root = scratch / "root"
    for deb in _download((*packages, kernel_package), scratch):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    [vmlinuz] = (root / "boot").glob("vmlinuz-*")
    return root, vmlinuz


def build_agent_guest(directory: Path) -> tuple[Path, Path]:
    """(kernel, initramfs) of a tiny guest whose only job is to run qemu-ga."""
    kernel, initrd = directory / "vmlinuz", directory / "initrd.cpio"
    if kernel.exists() and initrd.exists():
        return kernel, initrd
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        root, vmlinuz = unpack_with_kernel(GUEST_PACKAGES, scratch)
        libraries = _shared_libraries(root / "usr/sbin/qemu-ga", root / "usr/lib/x86_64-linux-gnu")
        entries = [(d, stat.S_IFDIR | 0o755, b"") for d in (
            "bin", "dev", "proc", "sys", "run", "tmp", "var", "usr", "usr/sbin", "lib", "lib64",
            "lib/x86_64-linux-gnu", "usr/lib", "usr/lib/x86_64-linux-gnu")]
        entries.append(("init", stat.S_IFREG | 0o755, INIT.encode()))
        entries.append(("bin/busybox", stat.S_IFREG | 0o755, (root / "bin/busybox").read_bytes()))
        entries += [(f"bin/{applet}", stat.S_IFLNK | 0o777, b"busybox") for applet in APPLETS]
        entries.append(("usr/sbin/qemu-ga", stat.S_IFREG | 0o755, (root / "usr/sbin/qemu-ga").read_bytes()))
        for library in libraries:
            source = Path(library)
            # ldd names the extracted liburing by its scratch path: put it where the loader looks.
            target = (f"lib/x86_64-linux-gnu/{source.name}" if str(source).startswith(str(scratch))
                      else library.lstrip("/"))
            entries.append((target, stat.S_IFREG | 0o755, source.read_bytes()))
        initrd.write_bytes(_newc(entries))
        shutil.copyfile(vmlinuz, kernel)
    return kernel, initrd


@pytest.fixture(scope="module")
def agent_guest_files(sim) -> tuple[str, str, Path]:
    """The kernel and initramfs, placed inside the simulated host's root (its daemon runs there)."""
    try:
        kernel, initrd = build_agent_guest(state_dir() / "fixtures" / "agent-guest")
    except (subprocess.CalledProcessError, OSError, StopIteration) as error:
        pytest.fail(f"cannot build the agent test guest from Debian packages: {error}")
    inside = Path("/var/lib/tdxvirt-test-guest")
    target = sim.chroot / inside.relative_to("/")
    target.mkdir(parents=True, exist_ok=True)
    for source in (kernel, initrd):
        shutil.copyfile(source, target / source.name)
    return str(inside / kernel.name), str(inside / initrd.name), target


@pytest.fixture
def running_guest(qemu_conn, agent_guest_files):
    kernel, initrd, directory = agent_guest_files
    name = f"t-agent-{uuid.uuid4().hex[:8]}"
    console = directory / f"{name}.log"  # the guest's serial console, to tell why a boot failed
    xml = f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 clearcpuid=mtrr rdinit=/init panic=-1</cmdline>
  </os>
  <on_reboot>destroy</on_reboot>
  <devices>
    {AGENT_CHANNEL_XML}
    <serial type='file'><source path='/var/lib/tdxvirt-test-guest/{name}.log'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""
    domain = qemu_conn.defineXML(xml)
    try:
        domain.create()
        deadline = time.monotonic() + BOOT_SECONDS
        while agent_channel_state(domain.XMLDesc(0)) != "connected":
            tail = console.read_text(errors="replace")[-1500:] if console.exists() else ""
            assert domain.isActive(), f"the test guest stopped while booting:\n{tail}"
            assert time.monotonic() < deadline, f"qemu-ga did not connect within {BOOT_SECONDS} s:\n{tail}"
            time.sleep(0.5)
        yield name
    finally:
        try:
            domain.destroy()
        except libvirt.libvirtError:
            pass
        domain.undefine()
        console.unlink(missing_ok=True)


def test_verify_through_a_real_guest_agent(qemu_conn, running_guest):
    report = verify_domain(qemu_conn, running_guest, timeout=60)
    checks = {check.name: check for check in report.checks}
    assert not report.ok
    # What is true of this guest, read through qemu-ga from its own programs and /proc:
    assert checks["kernel argument clearcpuid=mtrr"].ok is True
    assert checks["TDX guest device"].ok is False
    assert "/dev/tdx_guest" in checks["TDX guest device"].detail
    assert checks["TDX memory encryption"].ok is False  # a TCG guest logs no memory encryption
    assert checks["NVIDIA driver loaded"].detail == "no nvidia module in lsmod"
    # Debian builds ECDSA in and ECDH as a module nobody loaded in this guest.
    assert checks["SPDM crypto"].detail == "not registered: ecdh-nist-p384"
    # No nvidia-smi in the guest: qemu-ga's own spawn error, passed on by libvirt.
    assert checks["GPU CC mode"].detail == ("nvidia-smi did not run: Failed to execute child process "
                                            "\u201cnvidia-smi\u201d (No such file or directory)")


def test_cli_verify_prints_each_check_and_its_fix(qemu_conn, running_guest, sim):
    from click.testing import CliRunner

    from tdxvirt.cli import main
    from tdxvirt.cli.guest import guest

    if "guest" not in main.commands:  # until the lead wires it into tdxvirt.cli
        main.add_command(guest)
    result = CliRunner().invoke(main, ["-c", sim.qemu_uri, "guest", "verify", running_guest])
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "RESULT", "DETAIL"]
    assert any(line.startswith("kernel argument clearcpuid=mtrr") and " ok " in line for line in lines)
    assert any(line.startswith("fix (GPU CC mode): ") for line in lines)
    assert result.stderr.startswith(f"tdxvirt: error: TD '{running_guest}' is not ready for its GPU: ")
    as_json = CliRunner().invoke(main, ["-c", sim.qemu_uri, "guest", "verify", running_guest, "--json"])
    data = json.loads(as_json.stdout)
    assert data["domain"] == running_guest and data["ok"] is False
    assert len(data["checks"]) == 7
