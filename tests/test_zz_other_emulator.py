"""Issue 27: a QEMU installed beside the distribution's (what `tdxvirt build run qemu
--install` makes) as a TD's <emulator> on the emulated TDX host. libvirt probes that
binary on its own and must find it TDX-capable; the emulated host runs it behind the
same wrapper as its own QEMU (tdxhost.OTHER_EMULATORS), starting anew when a QEMU was
installed after its namespaces were made. The QEMU here is a copy of the root's own
(a real QEMU 11 at another path): CI has no time to build one (docs/benchmarks.md has
the run with a QEMU tdxvirt built). Run late: it starts the emulated host anew.
"""

from __future__ import annotations

import json
import shutil
import uuid

from conftest import run_sim

from tdxvirt.sim import control, tdxhost

PREFIX = "opt/tdxvirt-test-qemu"
EMULATOR = f"/{PREFIX}/bin/qemu-system-x86_64"


def test_a_td_runs_with_a_qemu_installed_beside_the_distributions(sim, cc_on):
    root = sim.chroot
    installed = root / EMULATOR.lstrip("/")
    installed.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(root / "usr/bin/qemu-system-x86_64", installed)
    name = f"emu-{uuid.uuid4().hex[:8]}"
    try:
        assert not tdxhost.emulators_are_wrapped(root)  # installed after the host started
        control.up()
        assert tdxhost.emulators_are_wrapped(root)
        defined = run_sim("define", name, "--gpu", "38:00.0", "--allow-shared", "--memory", "1G",
                          "--vcpus", "1", "--qemu", EMULATOR)
        assert defined.returncode == 0, defined.stderr  # libvirt found that QEMU TDX-capable
        started = run_sim("start", name)
        assert started.returncode == 0, started.stderr
        record = root / "var/log/tdxvirt-sim" / f"{name}.argv.jsonl"
        ran = json.loads(record.read_text().splitlines()[-1])
        assert ran["real"].endswith("opt_tdxvirt-test-qemu_bin_qemu-system-x86_64")
        assert any(a.startswith('{"qom-type":"tdx-guest"') for a in ran["argv"])
        shown = json.loads(run_sim("show", name, "--json").stdout)
        [qemu] = [f for f in shown["recorded_files"] if f["file"] == "QEMU"]
        assert qemu["path"] == EMULATOR and qemu["state"] == "same"
    finally:
        run_sim("destroy", name)
        run_sim("undefine", name)
        shutil.rmtree(root / PREFIX)  # the namespace's bind over it goes with its next start

    missing = run_sim("define", f"{name}-x", "--gpu", "38:00.0", "--allow-shared", "--qemu", EMULATOR)
    assert missing.returncode != 0
    assert missing.stderr.strip() == (f"tdxvirt: error: --qemu '{EMULATOR}': no such file; give the "
                                      "path of an existing file")


def test_a_file_only_on_this_machine_is_named_as_not_on_the_simulated_host(sim, tmp_path):
    import tempfile
    from pathlib import Path

    with tempfile.NamedTemporaryFile(dir="/var/tmp", suffix=".fd") as here:  # not shared
        done = run_sim("define", "elsewhere", "--gpu", "38:00.0", "--allow-shared", "--ovmf", here.name)
    assert done.returncode != 0
    line, = done.stderr.strip().splitlines()
    assert f"{here.name} is on this machine but not on the simulated host" in line
    assert "move or copy the file there" in line
    assert not Path(sim.chroot / here.name.lstrip("/")).exists()
