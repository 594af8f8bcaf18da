"""Shared fixtures: the real TDX-aware libvirt (simulated host) and fake host roots."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import libvirt
import pytest

from tdxvirt.host import HostRoot
from tdxvirt.sim import control, layout
from tdxvirt.sim.hostroot import FakePciDevice, build_host_root
from tdxvirt.virt.conn import open_connection
from tdxvirt.virt.schema import find_schema_dir


@pytest.fixture(scope="session")
def sim():
    """The simulated host, up (scripts/setup installed it)."""
    control.up()
    return layout()


@pytest.fixture(scope="session")
def sim_uri(sim) -> str:
    """The TDX-aware test driver: fast fixtures (the emulated TDX host's qemu driver is
    ``qemu_conn``; what --sim targets)."""
    return sim.test_uri


@pytest.fixture(scope="session")
def conn(sim_uri):
    """A connection to libvirt 12.x's test driver, which knows TDX launch security."""
    connection = open_connection(sim_uri)
    assert connection.getLibVersion() >= 12_000_000
    yield connection
    connection.close()


@pytest.fixture(scope="session")
def schema_dir():
    directory = find_schema_dir()
    assert directory is not None, "libvirt 12.x schemas missing: run scripts/setup"
    return directory


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    """A state directory of the test's own (TDXVIRT_STATE_DIR): records, builds, caches."""
    directory = tmp_path / "state"
    monkeypatch.setenv("TDXVIRT_STATE_DIR", str(directory))
    return directory


@pytest.fixture
def host_root(tmp_path) -> HostRoot:
    """A fake host root: TDX on, an H100 SXM5 (real sysfs values) at 0000:38:00.0."""
    return build_host_root(tmp_path / "root")


@pytest.fixture
def gpu_host(tmp_path):
    """A fake host root whose H100 sits at an address unique to this test.

    The test driver's state is shared by every test (and the demo), and tdxvirt
    refuses a GPU another domain holds; a PCI domain number of the test's own keeps
    tests independent. Returns (HostRoot, "dddd:38:00.0").
    """
    address = f"{uuid.uuid4().int % 0xEFFF + 0x1000:04x}:38:00.0"
    return build_host_root(tmp_path / "root", devices=(FakePciDevice(address),)), address


def _undefine_if_present(connection, name: str) -> None:
    try:
        domain = connection.lookupByName(name)
    except libvirt.libvirtError:
        return
    if domain.isActive():
        domain.destroy()
    domain.undefine()


@pytest.fixture
def td_name(conn):
    """A domain name unique to this test, removed from libvirt afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    yield name
    _undefine_if_present(conn, name)


def pytest_addoption(parser):
    parser.addoption("--regen-golden", action="store_true",
                     help="rewrite tests/golden/*.xml from the current templates")


@pytest.fixture(scope="session")
def regen_golden(request) -> bool:
    return request.config.getoption("--regen-golden")


@pytest.fixture(scope="session")
def qemu_conn(sim):
    """The forky daemon's real qemu driver (QEMU 11.x, TCG only on this machine)."""
    connection = open_connection(sim.qemu_uri)
    yield connection
    try:
        connection.close()
    except Exception:  # the last tests restart that daemon (test_zz_one_host.py)
        pass


@pytest.fixture(scope="session")
def legacy_qemu_conn(sim):
    """libvirt 11.x's real qemu driver (trixie root): a libvirt that knows no TDX XML."""
    connection = open_connection(sim.legacy_qemu_uri)
    assert 11_000_000 <= connection.getLibVersion() < 11_006_000
    yield connection
    connection.close()


def _cc_mode(sim, mode: str):
    """The simulated H100's CC mode set to ``mode`` in the stand-in's state (written in
    place: the emulated host's hook reads the same file), restored afterwards."""
    import json
    from pathlib import Path

    state = Path(sim.gpu_tool_env["STANDIN_STATE"])
    before = state.read_text()
    modes = json.loads(before)
    modes.setdefault("0000:38:00.0", {"ppcie": "off"})["cc"] = mode
    state.write_text(json.dumps(modes) + "\n")
    yield
    state.write_text(before)


@pytest.fixture
def cc_on(sim):
    """The simulated H100 in CC mode (start's preflight wants it), restored afterwards."""
    yield from _cc_mode(sim, "on")


@pytest.fixture
def cc_off(sim):
    """The simulated H100 in CC mode off, as the real one reported, whatever an earlier
    run left; restored afterwards."""
    yield from _cc_mode(sim, "off")


@pytest.fixture(autouse=True)
def _environment_restored():
    """`--sim` run in-process (CliRunner) exports the simulated GPU tool's variables;
    no test may leave them, or anything else, to the next one."""
    import os

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def cli_runner(uri: str, host_root):
    """tdxvirt's CLI in-process against ``uri`` and ``host_root``: never a traceback."""
    from click.testing import CliRunner

    from tdxvirt.cli import main

    def invoke(*args):
        result = CliRunner().invoke(main, ["-c", uri, "--host-root", str(host_root), *args])
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert "Traceback" not in result.output
        return result

    return invoke


@pytest.fixture
def run(sim_uri, gpu_host):
    """The CLI on the test driver with this test's own fake GPU host."""
    return cli_runner(sim_uri, gpu_host[0].base)


def one_line_error(result, code: int) -> str:
    """The single `tdxvirt: error:` line of a CliRunner result with this exit code."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdxvirt: error: "), result.stderr
    return lines[0]


def discard(domain) -> None:
    """Destroy and undefine a domain object if it is still there (test clean-up, also
    for domains whose hostile names cannot be looked up again)."""
    try:
        if domain.isActive():
            domain.destroy()
        domain.undefine()
    except libvirt.libvirtError:
        pass


TDXVIRT = os.path.join(os.path.dirname(sys.executable), "tdxvirt")


def run_sim(*args) -> subprocess.CompletedProcess:
    """The installed tdxvirt against the emulated TDX host, in a process of its own."""
    return subprocess.run([TDXVIRT, "--sim", *args], capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.fixture
def td(sim, qemu_conn):
    """A TD with the simulated H100 defined on the emulated TDX host (1 vCPU, 1 GiB)."""
    name = f"td-{uuid.uuid4().hex[:8]}"
    defined = run_sim("define", name, "--gpu", "38:00.0", "--allow-shared", "--memory", "1G",
                      "--vcpus", "1")
    assert defined.returncode == 0, defined.stderr
    yield name
    run_sim("destroy", name)
    try:  # a test that saved it (virt-manager's Save) leaves an image libvirt will not undefine
        domain = qemu_conn.lookupByName(name)
        if domain.hasManagedSaveImage(0):
            domain.managedSaveRemove(0)
    except libvirt.libvirtError:
        pass
    assert run_sim("undefine", name).returncode == 0
