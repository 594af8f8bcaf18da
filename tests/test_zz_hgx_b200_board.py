"""Issue 28 on the emulated TDX host with an HGX B200 board (`tdxvirt sim up --board`):
eight B200s in one TD (multi-GPU passthrough), defined and started by libvirt's real
qemu driver, and what the host must have first. Run late: changing the board stops the
emulated host's TDs and starts it anew (as replacing a server's GPUs would); the board
is put back to the H100 afterwards, whatever happened.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from conftest import run_sim

from tdxvirt.host.fabric import FABRIC_MANAGER
from tdxvirt.host.procs import find_processes
from tdxvirt.sim import control, fabric, layout
from tdxvirt.sim.boards import HGX_GPUS
from tdxvirt.virt.conn import open_connection

SHORT = [address[5:] for address in HGX_GPUS]  # 18:00.0 ...


@pytest.fixture(scope="module")
def board():
    """The emulated host with the HGX B200 board (no Fabric Manager first), put back after."""
    sim = layout()
    modes = sim.gpu_tool_env["STANDIN_STATE"]
    with open(modes) as f:
        saved_modes = f.read()
    try:
        control.up(board="hgx-b200-no-fm")
        yield sim
    finally:
        control.up(board="h100")
        with open(modes, "w") as f:  # in place: the emulated host's hook reads this inode
            f.write(saved_modes)


def _checks(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def _gpus_on() -> None:
    done = run_sim("gpu", "cc-mode", *SHORT, "--set", "on", "--json")
    assert done.returncode == 0, done.stderr
    assert [d["cc_mode"] for d in json.loads(done.stdout)] == ["on"] * 8


def test_a_board_without_fabric_manager_is_named_by_host_check(board):
    listed = run_sim("gpu", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    gpus = json.loads(listed.stdout)
    assert [(g["address"], g["model"]) for g in gpus] == [(a, "B200") for a in HGX_GPUS]
    assert {max(g["bar_sizes"]) for g in gpus} == {256 << 30}  # read from the device

    report = json.loads(run_sim("host", "check", "--json").stdout)
    checks = _checks(report)
    for name in ("fabric manager", "nvlink subnet manager", "fabric manager: rail policy"):
        assert checks[name]["status"] == "fail", checks[name]
        assert checks[name]["remedy"]
    assert "nvidia-fabricmanager" in checks["fabric manager"]["remedy"]
    assert checks["gpu: address width"]["status"] == "ok"
    assert "4096 GiB window 8 GPU(s)" in checks["gpu: address width"]["found"]
    assert checks["gpu host drivers"]["status"] == "ok"  # nouveau, nova_core, nvidia unloaded
    planned = run_sim("host", "setup", "--dry-run")  # what setup cannot do: said, and failing
    assert planned.returncode != 0 and planned.stderr.count("\n") == 1, planned.stderr
    assert "cannot" in planned.stdout and "install nvidia-fabricmanager" in planned.stdout


def test_cc_on_without_fabric_manager_is_refused_before_any_gpu_is_touched(board):
    runs = board.gpu_tool_env["STANDIN_RECORD"]
    before = open(runs).read() if Path(runs).exists() else ""
    done = run_sim("gpu", "cc-mode", *SHORT, "--set", "on")
    assert done.returncode != 0
    line, = [x for x in done.stderr.strip().splitlines() if not x.startswith("tdxvirt: note:")]
    assert "Fabric Manager" in line and "nvlsm" in line
    assert (open(runs).read() if Path(runs).exists() else "") == before  # NVIDIA's tool never ran


def test_ppcie_is_refused_on_the_board_with_the_mode_it_uses_instead(board):
    done = run_sim("gpu", "cc-mode", SHORT[0], "--ppcie", "on")
    assert done.returncode != 0
    line, = done.stderr.strip().splitlines()
    assert "Blackwell" in line and "--set on" in line


def test_eight_b200s_start_in_one_td_on_the_emulated_host(board):
    control.up(board="hgx-b200")  # the same board with Fabric Manager and NVLSM running
    # a connection of its own: the board change started the emulated host's daemon anew
    conn = open_connection(board.qemu_uri)
    checks = _checks(json.loads(run_sim("host", "check", "--json").stdout))
    assert {checks[n]["status"] for n in ("fabric manager", "nvlink subnet manager",
                                          "fabric manager: rail policy")} == {"ok"}
    _gpus_on()
    name = f"mpt-{uuid.uuid4().hex[:8]}"
    gpu_args = [arg for address in SHORT for arg in ("--gpu", address)]
    defined = run_sim("define", name, *gpu_args, "--memory", "16G", "--vcpus", "8")
    assert defined.returncode == 0, defined.stderr
    try:
        started = run_sim("start", name)
        assert started.returncode == 0, started.stderr
        assert conn.lookupByName(name).isActive()

        record = layout().chroot / "var/log/tdxvirt-sim" / f"{name}.argv.jsonl"
        argv = json.loads(record.read_text().splitlines()[-1])["argv"]
        devices = [json.loads(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a == "-device"
                   and argv[i + 1].startswith("{")]
        root_ports = {d["id"] for d in devices if d["driver"] == "pcie-root-port"}
        gpus = [d for d in devices if d["driver"] == "vfio-pci"]
        assert len(gpus) == 8
        assert all(g["iommufd"] == "iommufd0" and g["bus"] in root_ports for g in gpus)
        assert len({g["bus"] for g in gpus}) == 8  # each behind a root port of its own
        assert "name=opt/ovmf/X-PciMmio64Mb,string=4194304" in argv  # 4 TiB
        cpu = argv[argv.index("-cpu") + 1]
        assert cpu.startswith("host,") and "host-phys-bits=on" in cpu  # the host's address width

        shown = run_sim("show", name, "--json")
        assert json.loads(shown.stdout)["gpus"] == list(HGX_GPUS)
    finally:
        run_sim("destroy", name)
        run_sim("undefine", name)
        conn.close()


def test_the_h100_board_comes_back_without_the_fabric_daemons(board):
    control.up(board="hgx-b200")
    fm = find_processes(board.host(), FABRIC_MANAGER)
    assert fm and all(Path(f"/proc/{p.pid}/root").resolve() == board.chroot.resolve() for p in fm)
    control.up(board="h100")
    listed = json.loads(run_sim("gpu", "list", "--json").stdout)
    assert [g["address"] for g in listed] == ["0000:38:00.0"]
    assert not find_processes(board.host(), FABRIC_MANAGER)  # stopped with the host's daemons
    assert not (board.chroot / fabric.CONFIG).exists()  # the settings file tdxvirt wrote
