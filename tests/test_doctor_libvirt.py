"""Doctor checks libvirt and QEMU answer: the real libvirt 12.8 daemon and QEMU 11.1.

What this machine cannot produce (domain capabilities of a real TDX host, an older
libvirt) comes from a stand-in that wraps the real connection and changes only that
answer, starting from libvirt 12.8's real domain capabilities.
"""

from __future__ import annotations

import json
import textwrap

import pytest
from click.testing import CliRunner
from lxml import etree
from test_doctor_host import by_name, statuses, tdx_ready_root

from tdxvirt.cli import main
from tdxvirt.cli.host import host
from tdxvirt.doctor import connection, ovmf, qemu, run_checks
from tdxvirt.doctor.context import Context, is_remote, parse_object_help, parse_qemu_version
from tdxvirt.host import HostRoot
from tdxvirt.host.commands import RecordingRunner, SubprocessRunner
from tdxvirt.pci import PciAddress
from tdxvirt.sim import layout
from tdxvirt.virt.conn import open_connection

if "host" not in main.commands:
    main.add_command(host)

FORKY = HostRoot(layout().chroot)


@pytest.fixture(scope="module")
def qemu_conn(sim):
    """libvirt 12.8's real QEMU driver in the forky root (TCG only: no KVM TDX here)."""
    connection_ = open_connection(layout().qemu_uri)
    yield connection_
    connection_.close()


@pytest.fixture(scope="module")
def real_object_help() -> str:
    """QEMU 11.1's own `-object help`, run in the forky root."""
    result = SubprocessRunner(FORKY).run(("qemu-system-x86_64", "-object", "help"))
    assert result.ok, result.stderr
    return result.stdout


class TdxHostAnswers:
    """The emulated TDX host's real connection, answering under another version, or as
    a libvirt older than 11.6 (no TDX in its domain capabilities) would."""

    def __init__(self, conn, tdx: bool = True, version: int | None = None):
        self._conn, self._tdx, self._version = conn, tdx, version

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def getLibVersion(self):
        return self._version or self._conn.getLibVersion()

    def getDomainCapabilities(self, *args):
        xml = self._conn.getDomainCapabilities(*args)
        assert "<tdx supported='yes'/>" in xml  # the real answer of the emulated TDX host
        if self._tdx:
            return xml
        caps = etree.fromstring(xml.encode())  # a libvirt older than 11.6: no TDX at all
        for element in caps.xpath("features/tdx | features/launchSecurity"):
            element.getparent().remove(element)
        return etree.tostring(caps, encoding="unicode")


def test_real_qemu_11_lists_tdx_guest(real_object_help):
    objects = parse_object_help(real_object_help)
    assert "tdx-guest" in objects and "iommufd" in objects and "memory-backend-ram" in objects
    assert "List" not in objects


def test_qemu_check_runs_the_emulator_libvirt_names(qemu_conn):
    ctx = Context(FORKY, uri=layout().qemu_uri, connect=lambda: qemu_conn,
                  runner=SubprocessRunner(FORKY))
    assert ctx.emulator == "/usr/bin/qemu-system-x86_64"  # from domain capabilities
    checks = by_name(qemu.checks(ctx))
    assert checks["qemu: tdx-guest"].status == "ok"
    assert checks["qemu: tdx-guest"].found.endswith("lists tdx-guest")
    assert checks["qemu: version"].status == "ok"
    assert checks["qemu: version"].found.startswith("11.")


def test_qemu_without_tdx_guest_fails(real_object_help, ready_root):
    without = real_object_help.replace("  tdx-guest\n", "")
    write_emulator(ready_root)
    runner = RecordingRunner(replies={
        ("/usr/bin/qemu-system-x86_64", "-object"): (0, without, ""),
        ("/usr/bin/qemu-system-x86_64", "--version"): (
            0, "QEMU emulator version 9.1.0 (qemu-tdx)\nCopyright (c) 2003-2024\n", "")})
    checks = by_name(qemu.checks(Context(ready_root, runner=runner)))
    assert checks["qemu: tdx-guest"].status == "fail"
    assert checks["qemu: version"] .found == "9.1.0 < 10.1"
    assert runner.calls == [["/usr/bin/qemu-system-x86_64", "-object", "help"],
                            ["/usr/bin/qemu-system-x86_64", "--version"]]


def test_no_qemu_at_all_fails(ready_root):
    check = qemu.checks(Context(ready_root, runner=RecordingRunner()))[0]
    assert (check.status, check.found) == ("fail", "no QEMU found (qemu-system-x86_64)")


@pytest.fixture
def ready_root(tmp_path) -> HostRoot:
    return tdx_ready_root(tmp_path / "root")


def write_emulator(root: HostRoot) -> None:
    path = root.path("/usr/bin/qemu-system-x86_64")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")  # presence only: the runner answers for it


def test_the_emulated_tdx_hosts_real_domcaps_give_the_native_dialect(qemu_conn, ready_root):
    ctx = Context(FORKY, uri=layout().qemu_uri, connect=lambda: qemu_conn,
                  runner=SubprocessRunner(FORKY))
    checks = by_name(connection.checks(ctx))
    assert statuses(connection.checks(ctx)) == {
        "libvirt: connection": "ok", "libvirt: version": "ok",
        "libvirt: domain capabilities": "ok", "libvirt: dialect": "ok"}
    assert checks["libvirt: version"].found.startswith("12.")
    assert connection.dialect(ctx) == "native"


def test_tdx_host_answers_give_the_native_dialect(qemu_conn, ready_root):
    ctx = Context(ready_root, uri="qemu:///system",
                  connect=lambda: TdxHostAnswers(qemu_conn), runner=RecordingRunner())
    assert statuses(connection.checks(ctx)) == {
        "libvirt: connection": "ok", "libvirt: version": "ok",
        "libvirt: domain capabilities": "ok", "libvirt: dialect": "ok"}
    assert connection.dialect(ctx) == "native"


def test_canonical_and_qemu_args_dialects(qemu_conn, ready_root, real_object_help):
    canonical = Context(ready_root, uri="qemu:///system", runner=RecordingRunner(),
                        connect=lambda: TdxHostAnswers(qemu_conn, version=11_000_000))
    assert connection.dialect(canonical) == "canonical"
    write_emulator(ready_root)
    runner = RecordingRunner(replies={
        ("/usr/bin/qemu-system-x86_64", "-object"): (0, real_object_help, "")})
    old = Context(ready_root, uri="qemu:///system", runner=runner,
                  connect=lambda: TdxHostAnswers(qemu_conn, tdx=False, version=11_003_000))
    assert connection.dialect(old) == "qemu-args"
    checks = by_name(connection.checks(old))
    assert checks["libvirt: dialect"].status == "warn"
    assert checks["libvirt: domain capabilities"].found.startswith("say nothing of TDX")


def test_caps_reporting_tdx_while_kvm_says_no_is_a_warning_before_11_10(qemu_conn, ready_root):
    ready_root.path("/sys/module/kvm_intel/parameters/tdx").write_text("N\n")
    ctx = Context(ready_root, uri="qemu:///system", runner=RecordingRunner(),
                  connect=lambda: TdxHostAnswers(qemu_conn, version=11_006_000))
    check = by_name(connection.checks(ctx))["libvirt: domain capabilities"]
    assert check.status == "warn" and "libvirt < 11.10" in check.found


def test_unreachable_libvirt_fails_naming_the_uri(ready_root):
    uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
    ctx = Context(ready_root, uri=uri, connect=lambda: open_connection(uri),
                  runner=RecordingRunner())
    [check] = connection.checks(ctx)
    assert check.status == "fail" and check.found.startswith(f"cannot connect to libvirt at {uri}")


def test_simulated_host_test_driver(conn, sim_uri, ready_root):
    ctx = Context(ready_root, uri=sim_uri, connect=lambda: conn, runner=RecordingRunner())
    assert statuses(connection.checks(ctx))["libvirt: domain capabilities"] == "skip"
    assert connection.dialect(ctx) == "native"
    assert statuses(qemu.checks(ctx)) == {"qemu: tdx-guest": "skip"}


NODE_XML = """<node>
  <device>
    <name>pci_0000_38_00_0</name>
    <parent>computer</parent>
    <capability type='pci'>
      <class>0x030200</class>
      <domain>0</domain><bus>56</bus><slot>0</slot><function>0</function>
      <product id='0x2330'/>
      <vendor id='0x10de'>NVIDIA Corporation</vendor>
      <iommuGroup number='42'>
        <address domain='0x0000' bus='0x38' slot='0x00' function='0x0'/>
        <address domain='0x0000' bus='0x37' slot='0x00' function='0x0'/>
      </iommuGroup>
    </capability>
  </device>
  <device>
    <name>pci_0000_37_00_0</name>
    <parent>computer</parent>
    <capability type='pci'>
      <class>0x020000</class>
      <domain>0</domain><bus>55</bus><slot>0</slot><function>0</function>
      <product id='0x1593'/>
      <vendor id='0x8086'>Intel Corporation</vendor>
      <iommuGroup number='42'>
        <address domain='0x0000' bus='0x38' slot='0x00' function='0x0'/>
        <address domain='0x0000' bus='0x37' slot='0x00' function='0x0'/>
      </iommuGroup>
    </capability>
  </device>
</node>
"""


def test_remote_uri_reads_gpus_from_node_devices_and_skips_sysfs(tmp_path, ready_root):
    """libvirt's test driver with a node of the H100's real ids stands in for the remote host."""
    node = tmp_path / "node.xml"
    node.write_text(NODE_XML)
    remote_conn = open_connection(f"test://{node}")
    uri = "qemu+ssh://gpuhost.example/system"
    assert is_remote(uri) and not is_remote("qemu:///system") and not is_remote(
        "test+unix:///default?socket=/x")
    ctx = Context(ready_root, uri=uri, connect=lambda: remote_conn, runner=RecordingRunner())
    checks = run_checks(ctx)
    skipped = [c.name for c in checks if c.status == "skip" and "remote host" in c.found]
    # libvirt 9.0's in-process test driver gives no domain capabilities, so the firmware
    # cannot be listed either.
    assert skipped == ["cpu: TDX", "kernel config", "kernel command line", "vfio",
                       "qemu: tdx-guest", "ovmf: TDX firmware", "qemu.conf", "libvirt hook",
                       "passt (--network user)", "interrupted changes", "gpu host"]
    gpu = by_name(checks)
    assert gpu["gpu 0000:38:00.0: driver"].status == "skip"  # the test driver drops drivers
    assert gpu["gpu 0000:38:00.0: iommu group"].status == "warn"
    assert "0000:37:00.0" in gpu["gpu 0000:38:00.0: iommu group"].found
    ctx2 = Context(ready_root, uri=uri, connect=lambda: remote_conn, runner=RecordingRunner(),
                   gpus=(PciAddress.parse("37:00.0"),))
    assert by_name(run_checks(ctx2))["gpu 0000:37:00.0"].status == "fail"
    assert ctx.runner.calls == []  # nothing ran on this machine for a remote host
    remote_conn.close()


def test_remote_tdx_host_answers_through_libvirt(qemu_conn, ready_root):
    ctx = Context(ready_root, uri="qemu+ssh://gpuhost.example/system", runner=RecordingRunner(),
                  connect=lambda: TdxHostAnswers(qemu_conn))
    assert statuses(connection.checks(ctx))["libvirt: domain capabilities"] == "ok"
    assert ovmf.checks(ctx)[0].found == "libvirt lists /usr/share/ovmf/OVMF.inteltdx.ms.fd"
    assert parse_qemu_version("QEMU emulator version 11.1.2 (Debian 1:11.1.2+ds-3)") == (11, 1, 2)


def _invoke(*args):
    result = CliRunner().invoke(main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_cli_check_passes_on_a_ready_host(sim_uri, ready_root):
    result = _invoke("-c", sim_uri, "--host-root", str(ready_root.base), "host", "check", "--json")
    report = json.loads(result.stdout)
    failed = [c for c in report["checks"] if c["status"] == "fail"]
    assert failed == [] and result.exit_code == 0 and report["failed"] is False
    assert {c["name"] for c in report["checks"]} >= {
        "cpu: TDX flag", "kernel config: required", "vfio: device cdevs", "libvirt: dialect",
        "ovmf: TDX firmware", "gpu 0000:38:00.0: iommu group"}


def test_cli_check_table_and_exit_1_on_failures(sim_uri, host_root):
    result = _invoke("-c", sim_uri, "--host-root", str(host_root.base), "host", "check",
                     "--for-gpu", "38:00.0")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "STATUS", "FOUND", "REMEDY"]
    assert any(line.startswith("vfio: modules") and " fail " in line for line in lines)
    assert lines[-1].endswith("skip") and " fail" in lines[-1]


def test_cli_check_rejects_a_malformed_gpu(sim_uri, host_root):
    result = _invoke("-c", sim_uri, "--host-root", str(host_root.base), "host", "check",
                     "--for-gpu", "38:00")
    assert result.exit_code == 2
    assert result.stderr.startswith("tdxvirt: error: invalid PCI address '38:00'")


def test_host_group_help_lists_its_commands():
    result = _invoke("host", "--help")
    assert result.exit_code == 0
    assert textwrap.dedent("""\
        Commands:
          check  Check everything a TD with GPUs needs; exit 1 if anything fails.
          setup  Configure this host for TDs with GPUs (modprobe.d, kernel args,...""") in \
        result.stdout
