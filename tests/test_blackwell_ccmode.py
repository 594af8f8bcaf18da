"""`tdxvirt gpu cc-mode --set on` for Blackwell multi-GPU passthrough (issue 28) in NVIDIA's
order, on a fake HGX B200 host root (tests/gpu_fakes: eight B200s and the ConnectX
functions the NVLink switches are managed through), through tdxvirt's own command line
and the stand-in for NVIDIA's tool: Fabric Manager and NVLSM running first, CC on every
GPU with its reset, then every GPU read back; a board left half on is warned about."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from gpu_fakes import HGX_GPUS, STANDIN, StandinTool, add_process, blackwell, build, cli, hgx_b200_devices

from tdxvirt.cli.gpu import Hooks, make_group

AS_ROOT = Hooks(euid=lambda: 0)
AS_USER = Hooks(euid=lambda: 1000)
FM_PID, NVLSM_PID = 4101, 4102
QUERY = ["--query-cc-mode"]
SET_ON = ["--set-cc-mode", "on", "--reset-after-cc-mode-switch"]


@pytest.fixture
def board(tmp_path):
    root = build(tmp_path / "b200", hgx_b200_devices())
    return root, StandinTool(root, tmp_path)


def fabric(root, manager: bool = True, subnet: bool = True) -> None:
    if manager:
        add_process(root, FM_PID, "nv-fabricmanage", [])  # /proc's comm: 15 characters
    if subnet:
        add_process(root, NVLSM_PID, "nvlsm", [])


@pytest.fixture
def cc_mode(sim_uri):
    def invoke(root, tool, *args, hooks=AS_ROOT):
        result = CliRunner().invoke(
            cli(make_group(hooks)), ["-c", sim_uri, "--host-root", str(root.base), "gpu", "cc-mode",
                                     *args, "--tool", str(STANDIN)], env=tool.env)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        return result

    return invoke


def one_line_error(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = warnings(result)
    assert len(lines) == 1 and lines[0].startswith("tdxvirt: error: "), result.stderr
    return lines[0]


def warnings(result) -> list[str]:
    """stderr's warnings (a note that the shared test daemon is not up is not one)."""
    return [line for line in result.stderr.splitlines() if not line.startswith("tdxvirt: note: ")]


def device_runs(tool, flags) -> list[str]:
    """The devices of the tool's runs with these flags after --devices, in order."""
    return [run[1] for run in tool.runs() if run[2:] == flags]


# --- refused up front: Fabric Manager and NVLSM first -------------------------------

@pytest.mark.parametrize("manager, subnet, missing", [
    (False, True, "Fabric Manager (nv-fabricmanager) is not running"),
    (True, False, "the NVLink subnet manager (nvlsm) is not running"),
    (False, False, "Fabric Manager (nv-fabricmanager) and the NVLink subnet manager (nvlsm) are not"),
])
@pytest.mark.parametrize("mode", ["on", "devtools"])
def test_cc_on_without_the_fabric_services_is_refused_before_the_tool_runs(
        board, cc_mode, manager, subnet, missing, mode):
    root, tool = board
    fabric(root, manager, subnet)
    line = one_line_error(cc_mode(root, tool, *HGX_GPUS, "--set", mode), 1)
    assert missing in line
    assert "2 ConnectX 15b3:1021 function(s)" in line
    assert "start nvidia-fabricmanager with the NVLink subnet manager (nvlsm) first" in line
    assert "reset NVLink 5 GPUs need after Fabric Manager starts" in line
    assert tool.runs() == [] and tool.state() == {}
    # the dry run (no root needed) refuses the same way
    dry = one_line_error(cc_mode(root, tool, *HGX_GPUS, "--set", mode, "--dry-run", hooks=AS_USER), 1)
    assert dry == line and tool.runs() == []


def test_cc_off_and_queries_need_no_fabric(board, cc_mode):
    root, tool = board
    tool.set_state(**{a: {"cc": "on"} for a in HGX_GPUS})
    query = cc_mode(root, tool, HGX_GPUS[0], "--json")
    assert query.exit_code == 0, query.output
    assert json.loads(query.stdout)[0]["cc_mode"] == "on"
    result = cc_mode(root, tool, *HGX_GPUS, "--set", "off")
    assert result.exit_code == 0, result.output
    assert all(tool.state()[a]["cc"] == "off" for a in HGX_GPUS)


def test_a_blackwell_gpu_without_connectx_switch_management_needs_no_fabric(tmp_path, cc_mode):
    root = build(tmp_path / "one", (blackwell(HGX_GPUS[0], group=10),))
    tool = StandinTool(root, tmp_path)
    result = cc_mode(root, tool, HGX_GPUS[0], "--set", "on")
    assert result.exit_code == 0, result.output
    assert "set on (was off), device reset" in result.stdout


# --- NVIDIA's order: every GPU set, then every GPU read back -------------------------

def test_all_eight_are_set_then_all_read_back(board, cc_mode):
    root, tool = board
    fabric(root)
    result = cc_mode(root, tool, *HGX_GPUS, "--set", "on")
    assert result.exit_code == 0, result.output
    assert warnings(result) == []  # the whole board: nothing to warn about
    assert result.stdout.count("set on (was off), device reset") == 8
    assert tool.runs() == ([["--devices", a, *QUERY] for a in HGX_GPUS]
                           + [["--devices", a, *SET_ON] for a in HGX_GPUS]
                           + [["--devices", a, *QUERY] for a in HGX_GPUS])
    assert all(tool.state()[a]["cc"] == "on" for a in HGX_GPUS)


def test_a_gpu_another_reset_took_out_of_cc_on_is_named(board, cc_mode):
    root, tool = board
    fabric(root)
    tool.update(HGX_GPUS[2], fail="revert")  # falls back to off when another GPU is reset after it
    result = cc_mode(root, tool, *HGX_GPUS, "--set", "on")
    line = one_line_error(result, 1)
    assert line == (f"tdxvirt: error: setting CC mode on failed on 1 of 8 device(s); {HGX_GPUS[2]}: "
                    f"FAILED: set on, but after the reset of {HGX_GPUS[3]} and 4 more GPU(s) it "
                    "reports CC mode off, not on")
    rows = {row.split()[0]: row for row in result.stdout.splitlines()[2:]}
    assert all("set on (was off), device reset" in rows[a] for a in HGX_GPUS if a != HGX_GPUS[2])
    # it was read back only after the last set
    runs = tool.runs()
    last_set = max(i for i, run in enumerate(runs) if "--set-cc-mode" in run)
    assert device_runs(tool, QUERY)[8:] == list(HGX_GPUS)
    assert all("--set-cc-mode" not in run for run in runs[last_set + 1:])


def test_a_gpu_already_on_is_read_back_too(board, cc_mode):
    root, tool = board
    fabric(root)
    tool.set_state(**{HGX_GPUS[0]: {"cc": "on", "fail": "revert"}})
    line = one_line_error(cc_mode(root, tool, *HGX_GPUS[:4], "--set", "on"), 1)
    assert (f"{HGX_GPUS[0]}: FAILED: was on, but after the reset of {HGX_GPUS[1]} and 2 more "
            "GPU(s) it reports CC mode off, not on") in line
    assert device_runs(tool, SET_ON) == list(HGX_GPUS[1:4])


# --- part of the board ---------------------------------------------------------------

def test_setting_part_of_the_board_warns_naming_the_others(board, cc_mode):
    root, tool = board
    fabric(root)
    tool.update(HGX_GPUS[7], cc="on")
    result = cc_mode(root, tool, *HGX_GPUS[:4], "--set", "on")
    assert result.exit_code == 0, result.output
    warning = warnings(result)
    assert len(warning) == 1 and warning[0].startswith("tdxvirt: warning: 5 of the board's 8 "
                                                       "Blackwell GPUs are in CC mode on, but not "), warning
    assert f"{HGX_GPUS[4]} (off), {HGX_GPUS[5]} (off), {HGX_GPUS[6]} (off):" in warning[0]
    assert "a board mixing CC on with other modes fails attestation" in warning[0]
    assert f"gpu cc-mode {' '.join(HGX_GPUS[4:7])} --set on` sets the others" in warning[0]
    # the others are only read, after the four were set and checked
    assert device_runs(tool, SET_ON) == list(HGX_GPUS[:4])
    assert device_runs(tool, QUERY)[-4:] == list(HGX_GPUS[4:])
    assert [tool.state()[a]["cc"] for a in HGX_GPUS[4:]] == ["off", "off", "off", "on"]


def test_the_rest_of_the_board_set_later_gives_no_warning(board, cc_mode):
    root, tool = board
    fabric(root)
    tool.set_state(**{a: {"cc": "on"} for a in HGX_GPUS[:4]})
    result = cc_mode(root, tool, *HGX_GPUS[4:], "--set", "on")
    assert result.exit_code == 0, result.output
    assert warnings(result) == []


# --- dry run ---------------------------------------------------------------------------

def test_the_dry_run_shows_nvidias_order_with_every_tool_run(board, cc_mode):
    root, tool = board
    fabric(root)
    result = cc_mode(root, tool, *HGX_GPUS[:4], "--set", "on", "--dry-run", hooks=AS_USER)
    assert result.exit_code == 0, result.output
    tool_argv = f"  {sys.executable} {STANDIN} --devices "

    def commands(addresses, flags):
        return [tool_argv + f"{a} {' '.join(flags)}" for a in addresses]

    assert result.stdout.splitlines() == [
        "cc-mode (dry run, nothing changed): Blackwell multi-GPU passthrough on an HGX board, "
        "in NVIDIA's order",
        f"checked: 4 GPU(s) on vfio-pci and held by no VM; Fabric Manager and NVLSM running: "
        f"nv-fabricmanage (pid {FM_PID}) and nvlsm (pid {NVLSM_PID})",
        "read each GPU's CC mode (a GPU already on is skipped):",
        *commands(HGX_GPUS[:4], QUERY),
        "set CC on on each, with its reset (the reset NVLink 5 GPUs need after Fabric Manager "
        "starts):",
        *commands(HGX_GPUS[:4], SET_ON),
        "after the last set, read every GPU again and check it is on:",
        *commands(HGX_GPUS[:4], QUERY),
        "read the board's 4 other Blackwell GPU(s) (a warning if one is not on: a board mixing "
        "CC modes fails attestation):",
        *commands(HGX_GPUS[4:], QUERY)]
    assert tool.runs() == []


# --- the stand-in names Blackwell as the real tool does ----------------------------

def test_the_standin_names_every_gpu_as_the_real_tool_does():
    from gpu.devid_names import GPU_NAME_BY_DEVID  # the real tool's table (tdxvirt[gpu])

    from tdxvirt.host.nvidia import BLACKWELL_MODELS
    from tdxvirt.sim import standin_gpu_tools

    assert set(BLACKWELL_MODELS) <= set(standin_gpu_tools.GPU_NAMES)
    assert {i: GPU_NAME_BY_DEVID[i] for i in standin_gpu_tools.GPU_NAMES} == standin_gpu_tools.GPU_NAMES


def test_the_standin_prints_a_b200_as_the_real_tool_does(board):
    root, tool = board
    done = subprocess.run([sys.executable, str(STANDIN), "--devices", HGX_GPUS[0], "--query-cc-mode"],
                          capture_output=True, text=True, timeout=60, env=tool.env)
    assert done.returncode == 0, done.stderr
    assert f"   GPU {HGX_GPUS[0]} B200 0x2901 BAR0 0x580000000000\n" in done.stdout
    assert done.stderr.rstrip().endswith(f"GPU {HGX_GPUS[0]} B200 0x2901 BAR0 0x580000000000 CC mode is off")
