"""The emulated TDX host: libvirt 12.x's real qemu driver validates, defines and runs TDs.

``tdxvirt sim up`` runs the forky root's libvirtd believing it is on a KVM + TDX host
(tdxvirt.sim.tdxhost). Everything here goes through that driver's real code: its
define-time TDX validation, its QEMU command line (``domxml-to-native`` and the one it
really starts QEMU with, recorded by the emulator wrapper), and its lifecycle.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import libvirt
import pytest
from click.testing import CliRunner
from lxml import etree
from scenarios import plan_for, scenarios
from xmltools import QEMU_NS, dropped_elements

from tdxvirt.cli import main
from tdxvirt.domain.render import render_domain

TDXVIRT = os.path.join(os.path.dirname(sys.executable), "tdxvirt")
UPSTREAM = sorted(s.name for s in scenarios() if s.dialect != "canonical")
SCENARIOS = {s.name: s for s in scenarios()}
MMIO = "name=opt/ovmf/X-PciMmio64Mb,"


def _plan(name: str, tmp_path):
    _, plan = plan_for(SCENARIOS[name], tmp_path / "root")
    # the scenarios' emulator path is a file outside the daemon's root; libvirt's own is used
    return dataclasses.replace(plan, name=f"h-{uuid.uuid4().hex[:10]}", emulator=None)


@pytest.fixture(params=UPSTREAM)
def defined(request, qemu_conn, tmp_path):
    plan = _plan(request.param, tmp_path)
    xml = render_domain(plan)
    domain = qemu_conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    try:
        yield SCENARIOS[request.param], plan, xml, domain
    finally:
        domain.undefine()


def test_every_upstream_scenario_is_defined_with_nothing_dropped(defined):
    scenario, _, xml, domain = defined
    dumped = domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert dropped_elements(xml, dumped) == []
    args = etree.fromstring(dumped.encode()).xpath("//q:arg/@value", namespaces={"q": QEMU_NS})
    assert [a for a in args if a.startswith(MMIO)], "the MMIO window's -fw_cfg was dropped"


def _argv(qemu_conn, xml: str) -> list[str]:
    """The QEMU command line libvirt's qemu driver builds, without its environment."""
    words = shlex.split(qemu_conn.domainXMLToNative("qemu-argv", xml, 0))
    while "=" in words[0] and not words[0].startswith("/"):
        words.pop(0)
    return words[1:]


def _values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == option]


def _json_values(argv: list[str], option: str) -> list[dict]:
    return [json.loads(v) for v in _values(argv, option) if v.startswith("{")]


def _machine(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """(machine types named, the merged properties of every -machine option)."""
    types, props = [], {}
    for value in _values(argv, "-machine"):
        for part in value.split(","):
            if "=" in part:
                key, val = part.split("=", 1)
                props[key] = val
            else:
                types.append(part)
    return types, props


def command_line_problems(argv: list[str], plan) -> list[str]:
    """What the issue demands of a TD's QEMU command line, each miss as a sentence."""
    problems = []
    types, machine = _machine(argv)
    devices = _json_values(argv, "-device")
    objects = _json_values(argv, "-object")
    if len(types) != 1:
        problems.append(f"machine types {types}: exactly one expected")
    if plan.loader and (_values(argv, "-bios") != [plan.loader] or "pflash" in " ".join(argv)):
        problems.append(f"-bios {_values(argv, '-bios')} (pflash present: {'pflash' in ' '.join(argv)})")
    expected = {"smm": "off", "hpet": "off"}
    if plan.dialect != "plain":
        tdx = [o for o in objects if o["qom-type"] == "tdx-guest"]
        if len(tdx) != 1:
            return problems + [f"{len(tdx)} tdx-guest objects"]
        if tdx[0]["attributes"] != int(plan.policy_hex, 16):
            problems.append(f"tdx-guest attributes {tdx[0]['attributes']} != policy {plan.policy_hex}")
        if ("quote-generation-socket" in tdx[0]) != bool(plan.qgs_path):
            problems.append("quote-generation-socket does not match --qgs")
        expected |= {"confidential-guest-support": tdx[0]["id"], "kernel_irqchip": "split"}
        if "pmu=off" not in _values(argv, "-cpu")[0].split(","):
            problems.append(f"-cpu {_values(argv, '-cpu')} lacks pmu=off")
    problems += [f"-machine {k}={machine.get(k)} (want {v})" for k, v in expected.items()
                 if machine.get(k) != v]
    vfio = [d for d in devices if d["driver"] == "vfio-pci"]
    ports = {d["id"] for d in devices if d["driver"] == "pcie-root-port"}
    if len(vfio) != len(plan.hostdevs) or len({d["bus"] for d in vfio}) != len(vfio) \
            or not all(d["bus"] in ports for d in vfio):
        problems.append(f"{len(vfio)} vfio-pci devices for {len(plan.hostdevs)} hostdevs, "
                        "each on a pcie-root-port of its own")
    iommufd = [o["id"] for o in objects if o["qom-type"] == "iommufd"]
    if plan.iommufd and not (len(iommufd) == 1 and all(d.get("iommufd") == iommufd[0] for d in vfio)):
        problems.append("vfio-pci devices do not use the one iommufd object")
    windows = [v for v in _values(argv, "-fw_cfg") if v.startswith(MMIO)]
    if windows != [f"{MMIO}string={plan.mmio_mb}"]:
        problems.append(f"MMIO window options {windows}, want one of {plan.mmio_mb} MiB")
    extra = [d["driver"] for d in devices if d["driver"] in ("qemu-xhci", "virtio-balloon-pci")]
    if extra:
        problems.append(f"attack surface a TD does not need: {extra}")
    return problems


@pytest.mark.parametrize("name", UPSTREAM)
def test_the_qemu_command_line_libvirt_builds(name, qemu_conn, tmp_path):
    plan = _plan(name, tmp_path)
    # This machine has one NUMA node and no /dev/net/tun in the emulated host:
    # placement on node 1 and a NIC are left out of the conversion (README: limits).
    plan = dataclasses.replace(plan, numa_nodeset=None, network="none")
    argv = _argv(qemu_conn, render_domain(plan))
    assert command_line_problems(argv, plan) == []


def test_the_qemu_args_dialect_gives_qemu_one_machine_and_one_bios(qemu_conn, tmp_path):
    plan = _plan("qemu-args", tmp_path)
    argv = _argv(qemu_conn, render_domain(plan))
    assert len(_values(argv, "-bios")) == 1
    machines = _values(argv, "-machine")
    assert len(machines) == 2 and machines[1] == "confidential-guest-support=tdx"  # merged by QEMU


def test_the_qemu_args_dialect_on_libvirt_11(legacy_qemu_conn, tmp_path):
    """libvirt 11.x (no TDX XML, QEMU 10.0): what QEMU receives is still one TD."""
    plan = _plan("qemu-args", tmp_path)
    argv = _argv(legacy_qemu_conn, render_domain(plan))
    types, machine = _machine(argv)
    assert len(types) == 1 and len(_values(argv, "-bios")) == 1
    assert machine["confidential-guest-support"] == "tdx" and machine["kernel_irqchip"] == "split"
    assert [o["qom-type"] for o in _json_values(argv, "-object")].count("tdx-guest") == 1


REFUSALS = {
    "smm": (lambda r: r.find("features/smm").set("state", "on"),
            "Intel TDX launch security is not supported with SMM enabled"),
    "pmu": (lambda r: r.find("features/pmu").set("state", "on"),
            "Intel TDX launch security is not supported with PMU enabled"),
    "pflash": (lambda r: r.find("os/loader").set("type", "pflash"),
               "Intel TDX launch security is not supported with pflash loader"),
    "policy": (lambda r: setattr(r.find("launchSecurity/policy"), "text", "0x10000002"),
               "Only bit0(debug) and bit28(sept-ve-disable) are supported"),
    "irqchip": (lambda r: r.find("features/ioapic").set("driver", "kvm"),
                "Intel TDX launch security needs split kernel irqchip"),
}


@pytest.mark.parametrize("what", sorted(REFUSALS))
def test_the_drivers_tdx_validation_refuses_and_tdxvirt_refuses_first(what, qemu_conn, tmp_path):
    from tdxvirt.domain.td_rules import td_problems

    plan = _plan("one-gpu", tmp_path)
    root = etree.fromstring(render_domain(plan).encode())
    mutate, message = REFUSALS[what]
    mutate(root)
    xml = etree.tostring(root).decode()
    with pytest.raises(libvirt.libvirtError, match=message.replace("(", r"\(").replace(")", r"\)")):
        qemu_conn.defineXML(xml)
    assert plan.name not in qemu_conn.listDefinedDomains()
    assert len(td_problems(xml)) == 1  # tdxvirt's own check names it before libvirt would


@pytest.mark.parametrize("args, says", [
    (["--policy", "0x2"], "--policy"),
    (["--no-tdx", "--debug"], "--no-tdx"),
    (["--hugepages", "2M"], "guest_memfd"),
])
def test_refusals_through_tdxvirt_are_one_line_and_define_nothing(args, says, sim, qemu_conn):
    name = f"h-{uuid.uuid4().hex[:10]}"
    result = CliRunner().invoke(main, ["--sim", "define", name, "--gpu", "38:00.0", *args])
    assert result.exit_code in (1, 2) and says in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert name not in qemu_conn.listDefinedDomains()


# --- lifecycle on the emulated host ------------------------------------------------

GUEST_DIR = Path("/var/lib/tdxvirt-test-guest")


@pytest.fixture(scope="module")
def acpi_guest(sim):
    """The ACPI test guest's kernel, initramfs and a firmware without secure boot, at
    one path here (define checks the files it is given), below the simulated host's
    root (start's preflight looks there) and in the daemon's root (QEMU opens them).

    The firmware is the forky root's generic OVMF: Debian's only TDX build
    (OVMF.inteltdx.ms.fd) enforces secure boot with Microsoft's keys, which refuses a
    directly booted Debian kernel ("Secure boot image verification failed"); under TCG
    a TD's firmware runs as an ordinary guest's anyway."""
    from acpi_guest import build_acpi_guest

    from tdxvirt.paths import state_dir

    kernel, initrd = build_acpi_guest(state_dir() / "fixtures" / "acpi-guest")
    paths = {}
    for source in (kernel, initrd, sim.chroot / "usr/share/ovmf/OVMF.fd"):
        for base in (Path("/"), sim.chroot):  # the emulated host is one root (sim.host())
            target = base / GUEST_DIR.relative_to("/") / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        paths[source.name] = str(GUEST_DIR / source.name)
    return paths


def run(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([TDXVIRT, "--sim", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def wait_for_console(qemu_conn, name: str, text: str, seconds: float = 120) -> str:
    """Read the domain's serial console through libvirt's console stream (as `virsh
    console` does) until ``text`` appears; a blocking stream read in a thread, because
    a non-blocking one needs a libvirt event loop."""
    stream = qemu_conn.newStream(0)
    qemu_conn.lookupByName(name).openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
    seen = bytearray()

    def read() -> None:
        while text.encode() not in seen:
            data = stream.recv(4096)
            if not isinstance(data, bytes) or not data:
                return
            seen.extend(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(seconds)
    try:
        stream.abort()
    except libvirt.libvirtError:
        pass
    assert text.encode() in seen, f"no {text!r} on the console within {seconds} s: {bytes(seen[-800:])!r}"
    return seen.decode(errors="replace")


def recorded_starts(sim, name: str) -> list[dict]:
    log = sim.chroot / "var/log/tdxvirt-sim" / f"{name}.argv.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def listed(name: str) -> dict:
    rows = json.loads(run("list", "--json").stdout)
    return next(row for row in rows if row["name"] == name)


def test_td_lifecycle_on_the_qemu_driver(sim, qemu_conn, acpi_guest, cc_on):
    from acpi_guest import READY

    name = f"life-{uuid.uuid4().hex[:8]}"
    defined = run("define", name, "--gpu", "38:00.0", "--allow-shared", "--memory", "1G",
                  "--vcpus", "1", "--ovmf", acpi_guest["OVMF.fd"], "--kernel", acpi_guest["vmlinuz"],
                  "--initrd", acpi_guest["initrd-acpi.cpio"], "--cmdline", "console=ttyS0 rdinit=/init")
    assert defined.returncode == 0, defined.stderr
    try:
        started = run("start", name)
        assert started.returncode == 0, started.stderr
        row = listed(name)
        assert row["state"] == "running" and row["uptime_s"] is not None
        [first] = recorded_starts(sim, name)
        argv = first["argv"]  # exactly what libvirt gave QEMU (file descriptors and all)
        assert any('"qom-type":"tdx-guest"' in a for a in argv)
        assert any('"driver":"vfio-pci"' in a and '"iommufd":"iommufd0"' in a for a in argv)
        assert [a for a in argv if a.startswith(MMIO)] == [f"{MMIO}string=262144"]

        wait_for_console(qemu_conn, name, READY)
        stopped = run("stop", name, "--timeout", "90")  # ACPI power button; the guest obeys
        assert stopped.returncode == 0, stopped.stderr
        assert listed(name)["state"] == "shut off"

        assert run("start", name).returncode == 0
        assert run("destroy", name).returncode == 0 and listed(name)["state"] == "shut off"

        assert run("start", name).returncode == 0
        wait_for_console(qemu_conn, name, READY)
        pid_before = qemu_conn.lookupByName(name).ID()
        rebooted = run("reboot", name)
        assert rebooted.returncode == 0, rebooted.stderr
        deadline = time.monotonic() + 90
        while len(recorded_starts(sim, name)) < 4:  # a TD cannot reset: libvirt starts a new QEMU
            assert time.monotonic() < deadline, "no new QEMU after reboot"
            time.sleep(0.5)
        domain = qemu_conn.lookupByName(name)
        assert domain.isActive() and domain.ID() != pid_before
        assert run("destroy", name).returncode == 0
    finally:
        run("destroy", name)
        undefined = run("undefine", name)
        assert undefined.returncode == 0, undefined.stderr
    assert name not in qemu_conn.listDefinedDomains()


# --- what other tools do to a TD -------------------------------------------------------

TDX_ELEMENTS = ("launchSecurity[@type='tdx']", "os/loader[@type='rom']", "features/ioapic[@driver='qemu']",
                "features/smm[@state='off']", "features/pmu[@state='off']",
                "devices/hostdev/driver[@iommufd='yes']", "devices/memballoon[@model='none']",
                "devices/controller[@type='usb'][@model='none']", "clock/timer[@name='hpet'][@present='no']")


def test_virt_xml_edits_keep_a_td_a_td_that_starts(sim, qemu_conn, cc_on, tmp_path):
    """Debian's virt-xml (virtinst) edits a TD on the real driver: vCPUs, memory, a disk."""
    virt_xml = shutil.which("virt-xml")
    assert virt_xml, "virt-xml is missing: scripts/setup installs Debian's virtinst"
    name = f"vx-{uuid.uuid4().hex[:8]}"
    disk = GUEST_DIR / f"{name}.raw"
    for base in (sim.chroot, Path("/")):  # QEMU opens it; start's preflight looks for it
        target = base / disk.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"\0" * 1024 * 1024)
    # virtinst finds a disk by path through a storage pool on a connection it calls remote
    pool = qemu_conn.storagePoolCreateXML(
        f"<pool type='dir'><name>{name}</name><target><path>{GUEST_DIR}</path></target></pool>", 0)
    assert run("define", name, "--gpu", "38:00.0", "--allow-shared", "--memory", "1G",
               "--vcpus", "1").returncode == 0
    try:
        for edit in (["--edit", "--vcpus", "2"], ["--edit", "--memory", "2048"],
                     ["--add-device", "--disk", f"{disk},format=raw"]):
            done = subprocess.run([virt_xml, "--connect", sim.qemu_uri, name, *edit],
                                  capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, done.stderr
        root = etree.fromstring(qemu_conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
        assert root.findtext("vcpu") == "2" and root.findtext("memory") == str(2048 * 1024)
        assert root.xpath("devices/disk/source/@file") == [str(disk)]
        assert [x for x in TDX_ELEMENTS if not root.xpath(x)] == []
        assert [a for a in root.xpath("//q:arg/@value", namespaces={"q": QEMU_NS}) if a.startswith(MMIO)]
        started = run("start", name)
        assert started.returncode == 0, started.stderr
        assert run("destroy", name).returncode == 0
    finally:
        run("destroy", name)
        run("undefine", name)
        pool.destroy()
        for base in (sim.chroot, Path("/")):
            (base / disk.relative_to("/")).unlink(missing_ok=True)
