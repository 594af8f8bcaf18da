"""docs/json.md's key sets are what the commands print (schema version 1)."""

from __future__ import annotations

import json
import uuid

from click.testing import CliRunner

from tdxvirt.cli import main

LIST = {"name", "state", "type", "tdx", "dialect", "managed_by_tdxvirt", "vcpus", "memory_mib", "gpus",
        "uptime_s", "problems", "weakened"}
SHOW = LIST | {"uuid", "autostart", "persistent", "overlay", "seed", "builds", "mrtd", "rtmr1",
                "rtmr2", "title", "record", "disks", "interfaces", "recorded_files", "recorded_files_note"}
MEASURE = {"name", "firmware", "mrtd", "order", "order_note", "sections", "rtmr0", "rtmr1",
           "rtmr2", "unknown", "recorded", "rtmr_events", "rtmr_assumptions", "recorded_rtmr1",
           "recorded_rtmr2", "reference", "reference_differences", "recorded_files"}
SECTION = {"type", "address", "pages", "extended", "added"}
GPU = {"address", "vendor_id", "device_id", "model", "product", "kind", "driver", "iommu_group",
       "peers", "numa_node", "bar_sizes", "largest_bar", "cc_mode", "ppcie_mode", "td"}
HOST = {"uri", "host_root", "failed", "checks"}
CHECK = {"name", "status", "found", "remedy"}


def test_documented_keys_are_printed(sim, qemu_conn):
    name = f"js-{uuid.uuid4().hex[:8]}"
    runner = CliRunner()

    def read(*args):
        result = runner.invoke(main, ["--sim", *args, "--json"])
        assert result.exit_code in (0, 1), result.output  # host check exits 1 on a failure
        return json.loads(result.output)

    assert runner.invoke(main, ["--sim", "define", name, "--gpu", "38:00.0", "--allow-shared",
                                "--memory", "1G", "--vcpus", "1"]).exit_code == 0
    try:
        assert set(next(r for r in read("list") if r["name"] == name)) == LIST
        assert set(read("show", name)) == SHOW
        measured = read("measure", name)
        assert set(measured) == MEASURE and set(measured["sections"][0]) == SECTION
        assert {frozenset(g) for g in read("gpu", "list")} == {frozenset(GPU)}
        checked = read("host", "check")
        assert set(checked) == HOST and set(checked["checks"][0]) == CHECK
    finally:
        runner.invoke(main, ["--sim", "undefine", name])


def test_sim_status_json_keys(sim):
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([str(Path(sys.executable).parent / "tdxvirt"), "sim", "status", "--json"],
                          capture_output=True, text=True, timeout=30, check=True)
    status = json.loads(done.stdout)
    assert set(status) == {"installed", "daemon", "keeper_pid", "host_root", "devices",
                           "qemu_uri", "test_uri", "daemon_root", "board"}
    assert status["board"] == "h100"
    assert status["qemu_uri"] == sim.qemu_uri and status["daemon"] is True
