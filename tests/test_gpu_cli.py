"""`tdxvirt gpu ...` end to end: tdxvirt's own top-level command with the gpu group,
the real libvirt daemon where it can serve, fake host roots, an emulated kernel or a
recording libvirt stand-in for binding, and the stand-in NVIDIA tool."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from gpu_fakes import (
    HGX_GPUS,
    HGX_SWITCHES,
    STANDIN,
    FakeKernel,
    RecordingConnect,
    StandinTool,
    add_nvidia_information,
    add_process,
    audio,
    build,
    cli,
    driver_of,
    h100,
    hgx_devices,
    nic,
    override_of,
)

from tdxvirt.cli.gpu import Hooks, gpu, make_group

GPU = "0000:38:00.0"
AS_ROOT = Hooks(euid=lambda: 0)
AS_USER = Hooks(euid=lambda: 1000)


def tree(root):
    devices = sorted(p.name for p in root.path("/sys/bus/pci/devices").iterdir())
    return {bdf: (driver_of(root, bdf), override_of(root, bdf)) for bdf in devices}


@pytest.fixture
def run(sim_uri):
    def invoke(root, *args, hooks=AS_ROOT, uri=None, env=None):
        result = CliRunner().invoke(
            cli(make_group(hooks)),
            ["-c", uri or sim_uri, "--host-root", str(root.base), "gpu", *args], env=env)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        return result

    return invoke


def with_kernel(**kernel_options):
    """Hooks whose sysfs writer is the emulated kernel; the kernel is kept for asserts."""
    kernels = []

    def writer(root):
        kernels.append(FakeKernel(root, **kernel_options))
        return kernels[-1]

    return Hooks(euid=lambda: 0, sysfs_writer=writer), kernels


def one_line_error(result, code):
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdxvirt: error: "), result.stderr
    return lines[0]


# ---------------------------------------------------------------- list


def test_list_table(run, tmp_path):
    root = build(tmp_path / "r", (h100(GPU), audio("0000:38:00.1", 42), nic("0000:17:00.0", 7)))
    result = run(root, "list")
    assert result.exit_code == 0, result.output
    header, rule, row = result.stdout.splitlines()
    assert header.split() == ["DEVICE", "MODEL", "DRIVER", "IOMMU", "GROUP", "NUMA", "LARGEST",
                              "BAR", "CC", "PPCIE", "TD"]
    assert [cell.strip() for cell in row.split("  ") if cell.strip()] == [
        GPU, "H100 SXM5 80GB", "nvidia", "42 (+ 0000:38:00.1 snd_hda_intel)", "-", "128 GiB",
        "-", "-", "-"]


def test_list_json_hgx(run, tmp_path):
    root = build(tmp_path / "r", hgx_devices())
    records = json.loads(run(root, "list", "--json").stdout)
    assert [r["address"] for r in records] == sorted(HGX_GPUS + HGX_SWITCHES)
    by_address = {r["address"]: r for r in records}
    assert [by_address[a]["numa_node"] for a in HGX_GPUS] == [0] * 4 + [1] * 4
    assert by_address[HGX_GPUS[0]]["largest_bar"] == 128 << 30
    assert by_address[HGX_SWITCHES[0]]["kind"] == "NVSwitch"


def test_list_shows_the_td_from_the_real_daemon(run, sim_uri, gpu_host, td_name):
    from tdxvirt.cli import main

    host, address = gpu_host
    assert CliRunner().invoke(main, ["-c", sim_uri, "--host-root", str(host.base), "define",
                                     td_name, "--gpu", address]).exit_code == 0
    [record] = json.loads(run(host, "list", "--json").stdout)
    assert (record["address"], record["td"]) == (address, td_name)


def test_list_without_libvirt_warns_and_still_lists(run, tmp_path):
    root = build(tmp_path / "r", (h100(GPU),))
    result = run(root, "list", uri=f"test+unix:///default?socket={tmp_path}/no-such-socket")
    assert result.exit_code == 0
    assert "warning: no libvirt facts or TDs" in result.stderr
    assert GPU in result.stdout


def test_list_modes_through_the_tool(run, tmp_path):
    root = build(tmp_path / "r", (h100(GPU, driver="vfio-pci"),))
    tool = StandinTool(root, tmp_path)
    tool.set_state(**{GPU: {"cc": "on"}})
    result = run(root, "list", "--modes", "--tool", str(STANDIN), "--json", env=tool.env)
    [record] = json.loads(result.stdout)
    assert (record["cc_mode"], record["ppcie_mode"]) == ("on", None)
    assert "needs root" in one_line_error(
        run(root, "list", "--modes", "--tool", str(STANDIN), hooks=AS_USER, env=tool.env), 1)


# ---------------------------------------------------------------- detach / reattach


def test_detach_sysfs_moves_the_group_and_reattach_brings_it_back(run, tmp_path):
    root = build(tmp_path / "r", (h100(GPU), audio("0000:38:00.1", 42)))
    start = tree(root)
    # Each run gets a fresh kernel: tell it which drivers the devices' ids match.
    hooks, _ = with_kernel(natural={GPU: "nvidia", "0000:38:00.1": "snd_hda_intel"})
    result = run(root, "detach", "38:00.0", "--method", "sysfs", hooks=hooks)
    assert result.exit_code == 0, result.output
    assert "detached: nvidia -> vfio-pci" in result.stdout
    assert "detached: snd_hda_intel -> vfio-pci" in result.stdout
    assert tree(root) == {GPU: ("vfio-pci", "vfio-pci"), "0000:38:00.1": ("vfio-pci", "vfio-pci")}
    again = run(root, "detach", "38:00.0", "--method", "sysfs", hooks=hooks)
    assert again.exit_code == 0 and again.stdout.count("already on vfio-pci") == 2
    assert run(root, "reattach", GPU, "--method", "sysfs", hooks=hooks).exit_code == 0
    assert tree(root) == start


def test_detach_libvirt_is_the_default(run, tmp_path):
    root = build(tmp_path / "r", (h100(GPU),))
    conns = []
    hooks = Hooks(euid=lambda: 0,
                  libvirt_conn=lambda session: conns.append(RecordingConnect(FakeKernel(session.host)))
                  or conns[-1])
    result = run(root, "detach", GPU, hooks=hooks)
    assert result.exit_code == 0, result.output
    assert [call[1:3] for call in conns[0].calls] == [
        ("nodeDeviceLookupByName", ("pci_0000_38_00_0",)), ("detachFlags", ("vfio", 0))]
    assert tree(root)[GPU] == ("vfio-pci", "vfio-pci")


def test_detach_through_the_real_test_driver_fails_cleanly(run, sim_uri, tmp_path):
    """libvirt's test driver knows no such node device: the lookup fails, nothing changes."""
    assert sim_uri.startswith("test+unix://")  # the test driver: it never touches a device
    root = build(tmp_path / "r", (h100(GPU),))
    start = tree(root)
    result = run(root, "detach", GPU)
    line = one_line_error(result, 1)
    assert "libvirt virNodeDeviceLookupByName failed" in line and "nothing was changed" in line
    assert "FAILED" in result.stdout
    assert tree(root) == start


def test_detach_dry_run_needs_no_root_and_changes_nothing(run, tmp_path):
    root = build(tmp_path / "r", (h100(GPU),))
    start = tree(root)
    sysfs = run(root, "detach", GPU, "--method", "sysfs", "--dry-run", hooks=AS_USER)
    assert sysfs.exit_code == 0
    assert f"write 'vfio-pci' to {root.path('/sys/bus/pci/devices')}/{GPU}/driver_override" in sysfs.stdout
    libvirt_run = run(root, "detach", GPU, "--dry-run", "--reset", hooks=AS_USER)
    assert "virConnect.nodeDeviceLookupByName('pci_0000_38_00_0')" in libvirt_run.stdout
    assert "virNodeDevice.detachFlags('vfio', 0)" in libvirt_run.stdout
    assert tree(root) == start


def test_host_changes_need_root_before_anything_else(run, tmp_path):
    root = build(tmp_path / "r", (h100(GPU),))
    hooks, kernels = with_kernel()
    for args in (["detach", GPU, "--method", "sysfs"], ["reattach", "not-a-bdf"],
                 ["cc-mode", GPU, "--set", "on"]):
        line = one_line_error(run(root, *args, hooks=Hooks(euid=lambda: 1000,
                                                           sysfs_writer=hooks.sysfs_writer)), 1)
        assert "needs root" in line and "sudo" in line
    assert kernels == [] and tree(root)[GPU] == ("nvidia", "(null)")


@pytest.mark.parametrize("bdf, message", [
    ("38:00", "invalid PCI address '38:00'"),
    ("0000:39:00.0", "no PCI device 0000:39:00.0"),
    ("17:00.0", "0000:17:00.0 is not an NVIDIA GPU or NVSwitch"),
])
def test_bad_input_is_one_line_exit_2_nothing_changed(run, tmp_path, bdf, message):
    root = build(tmp_path / "r", (h100(GPU), nic("0000:17:00.0", 7)))
    start = tree(root)
    hooks, _ = with_kernel()
    for command, options in (("detach", ["--method", "sysfs"]), ("reattach", ["--method", "sysfs"]),
                             ("cc-mode", ["--set", "on"])):
        assert message in one_line_error(run(root, command, GPU, bdf, *options, hooks=hooks), 2)
    assert tree(root) == start


def test_group_with_a_nic_in_use_is_refused(run, tmp_path):
    root = build(tmp_path / "r", (h100(GPU), nic("0000:38:00.1", 42)))
    hooks, kernels = with_kernel()
    line = one_line_error(run(root, "detach", GPU, "--method", "sysfs", hooks=hooks), 1)
    assert "0000:38:00.1 (network controller 8086:1593)" in line and "ens1f0" in line
    assert kernels[0].writes == []


def test_busy_gpu_refused_unless_forced(run, tmp_path):
    root = build(tmp_path / "r", (h100(GPU),))
    add_nvidia_information(root, GPU, 0)
    add_process(root, 4711, "cuda-job", ["/dev/nvidia0"])
    hooks, _ = with_kernel()
    assert "cuda-job (pid 4711)" in one_line_error(
        run(root, "detach", GPU, "--method", "sysfs", hooks=hooks), 1)
    assert tree(root)[GPU] == ("nvidia", "(null)")
    assert run(root, "detach", GPU, "--method", "sysfs", "--force", hooks=hooks).exit_code == 0
    assert tree(root)[GPU] == ("vfio-pci", "vfio-pci")


def test_failure_on_the_third_rolls_back_and_reports_all_three(run, tmp_path):
    gpus = HGX_GPUS[:3]
    root = build(tmp_path / "r", tuple(h100(a, group=10 + i) for i, a in enumerate(gpus)))
    start = tree(root)
    hooks, _ = with_kernel(refuse={(gpus[2], "vfio-pci")})
    result = run(root, "detach", *gpus, "--method", "sysfs", hooks=hooks)
    line = one_line_error(result, 1)
    assert f"detach failed on {gpus[2]}" in line and "put back" in line
    rows = {row.split()[0]: row for row in result.stdout.splitlines()[2:]}
    assert "rolled back" in rows[gpus[0]] and "rolled back" in rows[gpus[1]]
    assert "FAILED" in rows[gpus[2]]
    assert tree(root) == start


def test_reset_reattaches_then_detaches(run, tmp_path):
    root = build(tmp_path / "r", (h100(GPU, driver="vfio-pci"),))
    hooks, kernels = with_kernel(natural={GPU: "nvidia"})
    result = run(root, "detach", GPU, "--reset", "--method", "sysfs", hooks=hooks)
    assert result.exit_code == 0, result.output
    assert [line.split()[-3:] for line in result.stdout.splitlines()[2:]] == [
        ["vfio-pci", "->", "nvidia"], ["nvidia", "->", "vfio-pci"]]
    assert tree(root)[GPU] == ("vfio-pci", "vfio-pci")


# ---------------------------------------------------------------- cc-mode


@pytest.fixture
def board(tmp_path):
    root = build(tmp_path / "r", hgx_devices())
    return root, StandinTool(root, tmp_path)


def test_cc_mode_query_and_set(run, board):
    root, tool = board
    query = run(root, "cc-mode", HGX_GPUS[0], "--tool", str(STANDIN), "--json", env=tool.env)
    assert query.exit_code == 0, query.output
    assert [(r["address"], r["cc_mode"], r["ppcie_mode"]) for r in json.loads(query.stdout)] == [
        (HGX_GPUS[0], "off", "off")]
    result = run(root, "cc-mode", HGX_GPUS[0], "--set", "on", "--tool", str(STANDIN), env=tool.env)
    assert result.exit_code == 0, result.output
    assert "set on (was off), device reset" in result.stdout
    assert tool.state()[HGX_GPUS[0]]["cc"] == "on"


def test_cc_mode_dry_run_prints_the_exact_commands(run, board):
    root, tool = board
    result = run(root, "cc-mode", HGX_GPUS[0], HGX_GPUS[1], "--set", "devtools", "--dry-run",
                 "--tool", str(STANDIN), hooks=AS_USER, env=tool.env)
    assert result.exit_code == 0, result.output
    commands = result.stdout.splitlines()[1:]
    assert commands == [f"  {sys.executable} {STANDIN} --devices {bdf} --set-cc-mode devtools "
                        "--reset-after-cc-mode-switch" for bdf in HGX_GPUS[:2]]
    assert tool.runs() == []


def test_cc_mode_ppcie_expands_to_the_board(run, board):
    root, tool = board
    result = run(root, "cc-mode", HGX_GPUS[5], "--ppcie", "on", "--tool", str(STANDIN), env=tool.env)
    assert result.exit_code == 0, result.output
    assert "PPCIe is board-wide: also setting" in result.stderr
    assert all(tool.state()[a]["ppcie"] == "on" for a in HGX_GPUS + HGX_SWITCHES)
    assert result.stdout.count("set on (was off), device reset") == 12


def test_cc_mode_set_and_ppcie_together_are_refused(run, board):
    root, tool = board
    assert "exclusive" in one_line_error(
        run(root, "cc-mode", HGX_GPUS[0], "--set", "on", "--ppcie", "on", env=tool.env), 2)


def test_cc_mode_failure_table_and_one_line(run, board):
    root, tool = board
    tool.update(HGX_GPUS[1], fail="stuck")
    result = run(root, "cc-mode", HGX_GPUS[0], HGX_GPUS[1], "--set", "on", "--tool", str(STANDIN),
                 env=tool.env)
    line = one_line_error(result, 1)
    assert f"{HGX_GPUS[1]}: FAILED: GpuError: failed to switch to CC mode on" in line
    assert "set on (was off)" in result.stdout


def test_cc_mode_without_the_tool_says_how_to_install(run, board, tmp_path):
    root, tool = board
    line = one_line_error(run(root, "cc-mode", HGX_GPUS[0], "--tool", str(tmp_path / "none"),
                              env=tool.env), 2)
    assert "pip install 'tdxvirt[gpu]'" in line


# ---------------------------------------------------------------- wiring


def test_the_group_to_wire_and_a_fast_start():
    assert gpu.name == "gpu" and sorted(gpu.commands) == ["cc-mode", "detach", "list", "reattach"]
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, tdxvirt.cli.gpu; print(sorted(m for m in "
         "('libvirt', 'lxml', 'tabulate', 'jinja2', 'tdxvirt.gpu') if m in sys.modules))"],
        capture_output=True, text=True, timeout=60)
    assert loaded.stdout.strip() == "[]", loaded.stderr
