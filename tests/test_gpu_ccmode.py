"""CC / PPCIe mode through NVIDIA's tool: a stand-in executable with the real tool's
flags and output drives the library; contract tests run the REAL installed
nvidia_gpu_tools (``--help`` only, never against a device)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
from gpu_fakes import HGX_GPUS, HGX_SWITCHES, STANDIN, StandinTool, add_process, build, h100, hgx_devices, nvswitch

from tdxvirt.errors import DeviceBusyError, HostNotReadyError, InputError, NotFoundError
from tdxvirt.gpu import admin_tool, ccmode
from tdxvirt.gpu.devices import read_targets

GPU = "0000:38:00.0"
BOARD = list(HGX_GPUS + HGX_SWITCHES)


@pytest.fixture
def standin(tmp_path, monkeypatch):
    """A host root with its devices, and the stand-in tool pointed at it."""

    def make(*devices):
        root = build(tmp_path / "r", devices)
        tool = StandinTool(root, tmp_path)
        for name, value in tool.env.items():
            monkeypatch.setenv(name, value)
        return root, tool, admin_tool.locate(str(STANDIN))

    return make


def test_query_selects_by_bdf_and_parses_the_mode(standin):
    root, tool, command = standin(h100(GPU, driver="vfio-pci"), h100("0000:b8:00.0", group=2))
    tool.set_state(**{GPU: {"cc": "devtools"}})
    [result] = ccmode.query(command, read_targets(root, [GPU]), with_ppcie=False)
    assert (result.address, result.cc_mode, result.ppcie_mode, result.ok) == (GPU, "devtools", None, True)
    assert tool.runs() == [["--devices", GPU, "--query-cc-mode"]]


def test_query_on_a_board_asks_gpus_for_both_modes_and_switches_for_ppcie(standin):
    root, tool, command = standin(*hgx_devices())
    devices = read_targets(root, [HGX_GPUS[0], HGX_SWITCHES[0]])
    results = ccmode.query(command, devices, ccmode.has_nvswitches(root))
    assert [(r.kind, r.cc_mode, r.ppcie_mode) for r in results] == [
        ("GPU", "off", "off"), ("NVSwitch", None, "off")]
    assert tool.runs() == [["--devices", HGX_GPUS[0], "--query-cc-mode", "--query-ppcie-mode"],
                           ["--devices", HGX_SWITCHES[0], "--query-ppcie-mode"]]


def test_set_cc_on_runs_set_with_reset_then_reads_it_back(standin):
    root, tool, command = standin(h100(GPU, driver="vfio-pci"))
    [result] = ccmode.set_cc(root, command, read_targets(root, [GPU]), "on")
    assert (result.cc_mode, result.result, result.ok) == ("on", "set on (was off), device reset", True)
    assert tool.runs() == [
        ["--devices", GPU, "--query-cc-mode"],
        ["--devices", GPU, "--set-cc-mode", "on", "--reset-after-cc-mode-switch"],
        ["--devices", GPU, "--query-cc-mode"]]
    assert tool.state()[GPU]["cc"] == "on"


def test_set_cc_to_the_mode_it_has_changes_nothing(standin):
    root, tool, command = standin(h100(GPU, driver="vfio-pci"))
    tool.set_state(**{GPU: {"cc": "on"}})
    [result] = ccmode.set_cc(root, command, read_targets(root, [GPU]), "on")
    assert result.result == "already on"
    assert len(tool.runs()) == 1  # the query only


def test_nvidia_order_vfio_first_is_enforced_before_the_tool_runs(standin):
    root, tool, command = standin(h100(GPU, driver="nvidia"))
    with pytest.raises(HostNotReadyError) as refused:
        ccmode.set_cc(root, command, read_targets(root, [GPU]), "on")
    assert f"run `tdxvirt gpu detach {GPU}` first" in str(refused.value)
    assert "on nvidia, not vfio-pci" in str(refused.value)
    assert tool.runs() == []


def test_a_device_a_running_vm_holds_is_not_switched(standin):
    root, tool, command = standin(h100(GPU, driver="vfio-pci"))
    add_process(root, 31337, "qemu-system-x86", ["/dev/vfio/42"])
    with pytest.raises(DeviceBusyError, match="qemu-system-x86"):
        ccmode.set_cc(root, command, read_targets(root, [GPU]), "on")
    assert tool.runs() == []


def test_cc_mode_of_an_nvswitch_is_refused(standin):
    root, tool, command = standin(*hgx_devices())
    with pytest.raises(InputError, match="NVSwitch, which has no CC mode"):
        ccmode.set_cc(root, command, read_targets(root, [HGX_SWITCHES[0]]), "on")


def test_one_failing_gpu_gives_one_line_and_the_other_is_still_set(standin):
    root, tool, command = standin(h100(GPU, driver="vfio-pci", group=1),
                                  h100("0000:b8:00.0", driver="vfio-pci", group=2))
    tool.set_state(**{"0000:b8:00.0": {"fail": "set"}})
    with pytest.raises(ccmode.ModeError) as failed:
        ccmode.set_cc(root, command, read_targets(root, [GPU, "b8:00.0"]), "on")
    first, second = failed.value.results
    assert (first.ok, first.cc_mode) == (True, "on")
    assert second.result == "FAILED: GpuError: FSP RPC to set the CC mode failed"
    assert str(failed.value) == ("setting CC mode on failed on 1 of 2 device(s); "
                                 "0000:b8:00.0: FAILED: GpuError: FSP RPC to set the CC mode failed")


def test_unexpected_mode_after_reset_reported_by_the_tool(standin):
    root, tool, command = standin(h100(GPU, driver="vfio-pci"))
    tool.set_state(**{GPU: {"fail": "stuck"}})
    with pytest.raises(ccmode.ModeError) as failed:
        ccmode.set_cc(root, command, read_targets(root, [GPU]), "on")
    assert failed.value.results[0].result == (
        "FAILED: GpuError: failed to switch to CC mode on, current mode is off.")


def test_unexpected_mode_after_reset_the_tool_did_not_notice(standin):
    root, tool, command = standin(h100(GPU, driver="vfio-pci"))
    tool.set_state(**{GPU: {"fail": "silent"}})
    with pytest.raises(ccmode.ModeError) as failed:
        ccmode.set_cc(root, command, read_targets(root, [GPU]), "devtools")
    assert failed.value.results[0].result == (
        "FAILED: after the reset it reports CC mode off, not devtools")


def test_ppcie_sets_the_whole_board_in_one_run_gpus_then_switches(standin):
    root, tool, command = standin(*hgx_devices())
    tool.set_state(**{HGX_GPUS[0]: {"cc": "on"}})
    results = ccmode.set_ppcie(root, command, read_targets(root, [HGX_GPUS[3]]), "on")
    assert [r.address for r in results] == BOARD
    assert all(r.ok and r.ppcie_mode == "on" for r in results)
    assert results[0].cc_mode == "off"  # the tool turns CC off for PPCIe
    [set_run] = [run for run in tool.runs() if "--set-ppcie-mode" in run]
    assert set_run == ["--devices", ",".join(BOARD), "--set-ppcie-mode", "on",
                       "--reset-after-ppcie-mode-switch"]
    assert all(tool.state()[a]["ppcie"] == "on" for a in BOARD)


def test_ppcie_failure_stops_the_board_and_names_each_device(standin):
    root, tool, command = standin(*hgx_devices())
    tool.set_state(**{HGX_GPUS[2]: {"fail": "set"}})
    with pytest.raises(ccmode.ModeError) as failed:
        ccmode.set_ppcie(root, command, read_targets(root, [HGX_GPUS[0]]), "on")
    results = {r.address: r.result for r in failed.value.results}
    assert results[HGX_GPUS[0]] == results[HGX_GPUS[1]] == "set on (was off), device reset"
    assert results[HGX_GPUS[2]] == "FAILED: GpuError: FSP RPC to set the PPCIe mode failed"
    assert all(results[a] == f"not reached: the tool stopped at {HGX_GPUS[2]}"
               for a in BOARD[3:])
    assert "failed on 10 of 12 device(s)" in str(failed.value)


def test_ppcie_skips_devices_already_in_the_mode(standin):
    root, tool, command = standin(*hgx_devices())
    tool.set_state(**{a: {"ppcie": "on"} for a in BOARD[1:]})
    results = ccmode.set_ppcie(root, command, read_targets(root, [HGX_GPUS[0]]), "on")
    assert [r.result for r in results][1:] == ["already on"] * 11
    [set_run] = [run for run in tool.runs() if "--set-ppcie-mode" in run]
    assert set_run[:2] == ["--devices", HGX_GPUS[0]]


def test_ppcie_needs_every_board_device_on_vfio(standin):
    devices = list(hgx_devices())
    devices[-1] = nvswitch(HGX_SWITCHES[-1], group=33, driver="nvidia-nvswitch")
    root, tool, command = standin(*devices)
    with pytest.raises(HostNotReadyError, match=f"{HGX_SWITCHES[-1]} is on nvidia-nvswitch"):
        ccmode.set_ppcie(root, command, read_targets(root, [HGX_GPUS[0]]), "on")
    assert tool.runs() == []


def test_ppcie_without_nvswitches_or_off_the_board_is_refused(standin):
    root, tool, command = standin(h100(GPU, driver="vfio-pci"))
    with pytest.raises(HostNotReadyError, match="no NVSwitch"):
        ccmode.set_ppcie(root, command, read_targets(root, [GPU]), "on")


def test_ppcie_refuses_a_gpu_that_is_not_on_the_board(standin):
    root, tool, command = standin(*hgx_devices(), h100("0000:c1:00.0", group=60,
                                                       driver="vfio-pci", device_id="0x2999"))
    with pytest.raises(InputError, match="0000:c1:00.0 .NVIDIA 0x2999. is not on the HGX board"):
        ccmode.set_ppcie(root, command, read_targets(root, ["c1:00.0"]), "on")


def test_an_nvtrust_checkout_or_the_environment_selects_the_tool(standin, tmp_path, monkeypatch):
    root, tool, _ = standin(h100(GPU, driver="vfio-pci"))
    checkout = tmp_path / "nvtrust" / "host_tools" / "python"
    checkout.mkdir(parents=True)
    shutil.copy(STANDIN, checkout / "nvidia_gpu_tools.py")
    from_checkout = admin_tool.locate(str(tmp_path / "nvtrust"))
    assert from_checkout.argv == (sys.executable, str(checkout / "nvidia_gpu_tools.py"))
    assert ccmode.query(from_checkout, read_targets(root, [GPU]), False)[0].cc_mode == "off"
    monkeypatch.setenv(admin_tool.ENV_PATH, str(STANDIN))
    assert admin_tool.locate().argv == (sys.executable, str(STANDIN))
    with pytest.raises(NotFoundError, match="does not exist"):
        admin_tool.locate(str(tmp_path / "nowhere"))


def test_not_installed_says_how_to_install():
    # -S: an interpreter without site-packages, where nvidia_gpu_tools is not importable.
    probe = subprocess.run(
        [sys.executable, "-S", "-c",
         "import sys; sys.path.insert(0, sys.argv[1]);"
         "from tdxvirt.gpu.admin_tool import locate; locate()",
         str(STANDIN.parents[2])], capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0
    assert "HostNotReadyError: NVIDIA's gpu-admin-tools is not installed: " \
           "`pip install 'tdxvirt[gpu]'`" in probe.stderr


def test_parser_reads_the_real_tools_lines():
    output = """NVIDIA GPU Tools version v2025.11.21o
Command line arguments: ['nvidia_gpu_tools.py', '--devices', '0000:b8:00.0']
Topo:
  PCI 0000:b7:00.0 8086:352a
   GPU 0000:b8:00.0 H100 0x2331 BAR0 0xde000000
2025-11-26,04:02:00.101 INFO     Selected GPU 0000:b8:00.0 H100 0x2331 BAR0 0xde000000
2025-11-26,04:02:00.102 WARNING  GPU 0000:b8:00.0 H100 0x2331 BAR0 0xde000000 has CC mode on, some functionality may not work
2025-11-26,04:02:00.103 INFO     GPU 0000:b8:00.0 H100 0x2331 BAR0 0xde000000 CC mode is on
2025-11-26,04:02:00.104 INFO     NvSwitch 0000:05:00.0 NVSwitch_gen3 0x22a3 BAR0 0x2000000000 PPCIe mode is off
2025-11-26,04:02:00.105 ERROR    Querying PPCIe mode is not supported on GPU 0000:c1:00.0 L40S 0x26b9 BAR0 0xe0000000
Traceback (most recent call last):
  File "nvidia_gpu_tools.py", line 4561, in <module>
    raise GpuError(f"{gpu} failed to switch to CC mode {opts.set_cc_mode}, current mode is {new_mode}.")
gpu.error.GpuError: GPU 0000:2a:00.0 H100 0x2330 BAR0 0x102002000000 failed to switch to CC mode on, current mode is off.
"""
    report = admin_tool.parse(output)
    assert report.devices["0000:b8:00.0"].modes == {"CC": "on"}
    assert report.devices["0000:05:00.0"].modes == {"PPCIe": "off"}
    assert admin_tool.without_device_text(report.devices["0000:c1:00.0"].errors[0]) == \
        "Querying PPCIe mode is not supported on"
    assert admin_tool.without_device_text(report.devices["0000:2a:00.0"].errors[0]) == \
        "GpuError: failed to switch to CC mode on, current mode is off."
    assert report.errors == []


# ---------------------------------------------------------------- contract


def _options(help_text: str) -> dict[str, set[str] | None]:
    """--flag -> its choices (None when it takes free text or nothing), from --help."""
    options: dict[str, set[str] | None] = {}
    for flag, choices in re.findall(r"(--[a-z0-9-]+)(?:[ =](\{[^}]*\}|[A-Z_]+))?", help_text):
        known = options.get(flag)
        if choices.startswith("{"):
            options[flag] = set(choices[1:-1].split(","))
        elif flag not in options:
            options[flag] = known
    return options


def _tdxvirt_argvs() -> list[list[str]]:
    """Every argument list tdxvirt builds for the tool."""
    bdfs = [HGX_GPUS[0], HGX_SWITCHES[0]]
    return ([admin_tool.query_args(bdfs[0], cc, ppcie) for cc in (True, False) for ppcie in (True, False)]
            + [admin_tool.set_cc_args(bdfs[0], mode) for mode in ccmode.CC_MODES]
            + [admin_tool.set_ppcie_args(bdfs, mode) for mode in ccmode.PPCIE_MODES])


def _check_against(options: dict[str, set[str] | None], argv: list[str]) -> None:
    for index, token in enumerate(argv):
        if token.startswith("--"):
            assert token in options, f"{token} is not an option of the tool"
            choices = options[token]
            following = argv[index + 1] if index + 1 < len(argv) else None
            if choices is not None:
                assert following in choices, f"{token} {following}: not one of {choices}"


@pytest.fixture(scope="module")
def real_help() -> str:
    """The REAL nvidia_gpu_tools' --help (it parses arguments before touching devices)."""
    tool = admin_tool.locate(None)  # the installed package, as `tdxvirt gpu cc-mode` runs it
    done = subprocess.run([*tool.argv, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: nvidia_gpu_tools.py" in done.stdout
    return done.stdout


def test_every_flag_tdxvirt_passes_exists_in_the_real_tool(real_help):
    options = _options(real_help)
    assert options["--set-cc-mode"] == set(ccmode.CC_MODES)
    assert options["--set-ppcie-mode"] == set(ccmode.PPCIE_MODES)
    for argv in _tdxvirt_argvs():
        _check_against(options, argv)
        assert "--gpu-name" not in argv and argv[0] == "--devices"


def test_the_standin_accepts_nothing_the_real_tool_does_not(real_help):
    standin_help = subprocess.run([sys.executable, str(STANDIN), "--help"],
                                  capture_output=True, text=True, timeout=60).stdout
    real, fake = _options(real_help), _options(standin_help)
    assert set(fake) <= set(real)
    assert {flag: fake[flag] for flag in fake if fake[flag]} == \
        {flag: real[flag] for flag in fake if fake[flag]}
