"""The GPU of a running TD is never reset, reattached or switched: refused from
libvirt's answer (which domains run with it), on the emulated TDX host with a TD that
libvirt started, even as a dry run; once the TD is off, the same commands plan again."""

from __future__ import annotations

import pytest
from conftest import run_sim

GPU = "0000:38:00.0"
UNDER_A_RUNNING_TD = {
    "reattach": (["gpu", "reattach", GPU, "--dry-run"], "a reattach"),
    "detach --reset": (["gpu", "detach", GPU, "--reset", "--dry-run"], "a reset"),
    "cc-mode --set off": (["gpu", "cc-mode", GPU, "--set", "off", "--dry-run"],
                          "a mode switch (with its reset)"),
}


@pytest.fixture
def running_td(td, cc_on):
    started = run_sim("start", td)
    assert started.returncode == 0, started.stderr
    yield td
    run_sim("destroy", td)


def test_every_gpu_change_under_a_running_td_is_one_line_naming_it(running_td):
    for what, (argv, action) in UNDER_A_RUNNING_TD.items():
        done = run_sim(*argv)
        assert done.returncode != 0, what
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, (what, done.stderr)
        assert lines[0] == (f"tdxvirt: error: {GPU} is passed through to running domain "
                            f"'{running_td}'; {action} would pull it from under that TD: stop it "
                            f"first (`tdxvirt --sim stop {running_td}`)"), what
        assert "dry run" not in done.stdout


def test_once_the_td_is_off_the_same_dry_runs_plan(running_td):
    assert run_sim("destroy", running_td).returncode == 0
    for what, (argv, _) in UNDER_A_RUNNING_TD.items():
        done = run_sim(*argv)
        assert "passed through to running domain" not in done.stderr, what
    reattach = run_sim(*UNDER_A_RUNNING_TD["reattach"][0])
    assert reattach.returncode == 0 and "dry run, nothing changed" in reattach.stdout, reattach.stderr
