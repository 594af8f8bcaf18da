"""The Ansible collection tdxvirt.tdx (ansible_collections/tdxvirt/tdx): real
ansible-playbook runs of its modules against the emulated TDX host (its qemu driver, with
the tdxvirt settings `--sim` applies: `sim: true`), and of tdx_host's real apply and
revert against a fake host root. Each module twice (the second run changes nothing),
check mode changes nothing and predicts the first run, diff mode shows what the CLI's
--dry-run prints, a bad parameter fails the task with tdxvirt's one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import libvirt
import pytest
import yaml
from conftest import run_sim
from test_hostcfg_setup import GRUB, MODPROBE, QEMU_CONF, debian_host, snapshot
from test_integrity import virt_xml

REPO = Path(__file__).resolve().parent.parent
CALLBACKS = REPO / "tests/ansible/callback_plugins"
PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")  # a new one per define


def play(tmp_path: Path, tasks: list[dict], *flags: str) -> list[dict]:
    """Run ``tasks`` in one play on localhost (the local connection, this venv's Python
    as the managed host's), returning each task's result as the record_results
    callback wrote it: {"task", "status", "result"}."""
    number = len(list(tmp_path.glob("play-*.yml")))
    book = tmp_path / f"play-{number}.yml"
    book.write_text(yaml.safe_dump([{"hosts": "localhost", "gather_facts": False,
                                     "tasks": tasks}]))
    record = tmp_path / f"play-{number}.jsonl"
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(REPO),
           "ANSIBLE_CALLBACK_PLUGINS": str(CALLBACKS), "ANSIBLE_CALLBACKS_ENABLED": "record_results",
           "TDXVIRT_ANSIBLE_RECORD": str(record), "ANSIBLE_HOME": str(tmp_path / "ansible-home"),
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
           "ANSIBLE_REMOTE_TMP": str(tmp_path / "ansible-remote-tmp"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCALHOST_WARNING": "false", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "false",
           "ANSIBLE_RETRY_FILES_ENABLED": "false", "ANSIBLE_DEPRECATION_WARNINGS": "false",
           "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([str(PLAYBOOK), "-i", "localhost,", "-c", "local",
                           "-e", f"ansible_python_interpreter={sys.executable}", *flags, str(book)],
                          capture_output=True, text=True, timeout=300, env=env, check=False)
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    results = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    assert len(results) == len(tasks), done.stdout + done.stderr
    return results


def result(tmp_path, task: dict, *flags: str) -> dict:
    """The one task's result, its status ("ok", "failed") under "_status"."""
    [answer] = play(tmp_path, [task], *flags)
    return {**answer["result"], "_status": answer["status"]}


def td_task(name: str, state: str, **options) -> dict:
    """tdx_td on the emulated TDX host: its H100 (shared: other tests' TDs hold it too)."""
    return {"tdxvirt.tdx.tdx_td": {"name": name, "state": state, "sim": True,
                                   "gpus": ["38:00.0"], "allow_shared": True, "memory": "1G",
                                   "vcpus": 1, **options}}


def names(qemu_conn) -> set[str]:
    return {d.name() for d in qemu_conn.listAllDomains()}


def state_of(qemu_conn, name: str) -> str:
    try:
        domain = qemu_conn.lookupByName(name)
    except libvirt.libvirtError:
        return "absent"
    return "running" if domain.isActive() else "shut off"


def cli_error(*args: str) -> str:
    """The CLI's one error line, without its "tdxvirt: error: " prefix."""
    done = run_sim(*args)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    return lines[0].removeprefix("tdxvirt: error: ")


@pytest.fixture
def td_name(qemu_conn):
    """A TD name of this test's own, and nothing of it left on the emulated host after."""
    name = f"ans-{uuid.uuid4().hex[:8]}"
    yield name
    run_sim("destroy", name)
    run_sim("undefine", name, "--remove-storage")
    assert name not in names(qemu_conn)


def test_td_through_every_state_check_mode_first_then_twice(tmp_path, qemu_conn, td_name, cc_on):
    defined = names(qemu_conn)
    predicted = result(tmp_path, td_task(td_name, "present"), "--check", "--diff")
    assert predicted["_status"] == "ok" and predicted["changed"] and predicted["defined"]
    assert names(qemu_conn) == defined  # check mode defined nothing
    # the diff is define --dry-run's output, the XML and what it would create
    dry = run_sim("define", td_name, "--gpu", "38:00.0", "--allow-shared", "--memory", "1G",
                  "--vcpus", "1", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert UUID.sub("", predicted["diff"]["prepared"]) == UUID.sub("", dry.stdout)
    assert f"would define '{td_name}'" in predicted["diff"]["prepared"]

    first = result(tmp_path, td_task(td_name, "present"))
    assert first["_status"] == "ok" and first["changed"] and first["defined"]
    assert state_of(qemu_conn, td_name) == "shut off"
    assert first["uuid"] == qemu_conn.lookupByName(td_name).UUIDString()
    again = result(tmp_path, td_task(td_name, "present"))
    assert again["_status"] == "ok" and not again["changed"] and not again["defined"]

    for state, libvirt_state in (("running", "running"), ("stopped", "shut off"),
                                 ("absent", "absent")):
        before = state_of(qemu_conn, td_name)
        options = {"stop_timeout": 1, "force": True} if state == "stopped" else {}
        check = result(tmp_path, td_task(td_name, state, **options), "--check")
        assert check["_status"] == "ok" and check["changed"], (state, check)
        assert state_of(qemu_conn, td_name) == before  # check mode changed nothing
        done = result(tmp_path, td_task(td_name, state, **options))
        assert done["_status"] == "ok" and done["changed"], (state, done)
        assert state_of(qemu_conn, td_name) == libvirt_state
        twice = result(tmp_path, td_task(td_name, state, **options))
        assert twice["_status"] == "ok" and not twice["changed"], (state, twice)
        assert state_of(qemu_conn, td_name) == libvirt_state


def test_a_weakened_td_is_repaired_and_reported_changed(tmp_path, sim, qemu_conn, td_name):
    assert result(tmp_path, td_task(td_name, "present"))["changed"]
    virt_xml(sim, td_name, "--edit", "--xml", "xpath.delete=./launchSecurity")
    weakened = qemu_conn.lookupByName(td_name).XMLDesc(0)

    predicted = result(tmp_path, td_task(td_name, "present"), "--check", "--diff")
    assert predicted["_status"] == "ok" and predicted["changed"] and predicted["repaired"]
    assert qemu_conn.lookupByName(td_name).XMLDesc(0) == weakened  # check mode repaired nothing
    dry = run_sim("repair", td_name, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    shown = dry.stdout.split("\nWould change:")[0] + "\n"
    assert predicted["diff"]["prepared"] == shown and '+  <launchSecurity type="tdx">' in shown

    repaired = result(tmp_path, td_task(td_name, "present"), "--diff")
    assert repaired["changed"] and repaired["repaired"] == predicted["repaired"]
    assert "<launchSecurity type='tdx'>" in qemu_conn.lookupByName(td_name).XMLDesc(0)
    assert not result(tmp_path, td_task(td_name, "present"))["changed"]


def test_bad_parameters_fail_in_tdxvirts_one_line(tmp_path, qemu_conn, td_name):
    before = names(qemu_conn)
    bad_gpu = result(tmp_path, td_task(td_name, "present", gpus=["zz:00.0"]))
    assert bad_gpu["_status"] == "failed" and not bad_gpu["changed"]
    assert bad_gpu["msg"] == cli_error("define", td_name, "--gpu", "zz:00.0")
    bad_memory = result(tmp_path, td_task(td_name, "running", memory="lots"))
    assert bad_memory["_status"] == "failed"
    assert bad_memory["msg"] == cli_error("define", td_name, "--gpu", "38:00.0", "--memory", "lots")
    assert "\n" not in bad_gpu["msg"] + bad_memory["msg"]
    unknown = result(tmp_path, td_task(td_name, "stopped", sim=False, uri="qemu+unix:///system?socket=/nonexistent"))
    assert unknown["_status"] == "failed" and "\n" not in unknown["msg"] and "/nonexistent" in unknown["msg"]
    choice = result(tmp_path, td_task(td_name, "gone"))  # Ansible's own check of choices
    assert choice["_status"] == "failed" and "state" in choice["msg"] and "\n" not in choice["msg"]
    assert names(qemu_conn) == before

    # defined with other values than the task asks for: one line, nothing redefined
    assert result(tmp_path, td_task(td_name, "present"))["changed"]
    other = result(tmp_path, td_task(td_name, "present", vcpus=2))
    assert other["_status"] == "failed" and "\n" not in other["msg"]
    assert "1 vCPUs, not 2" in other["msg"] and "state: absent" in other["msg"]
    assert "<vcpu placement='static'>1</vcpu>" in qemu_conn.lookupByName(td_name).XMLDesc(0)
    # the launch too: a policy or an MR value the TD was not defined with is no "ok"
    debug = result(tmp_path, td_task(td_name, "present", debug=True))
    assert debug["_status"] == "failed" and "policy 0x10000000, not 0x10000001" in debug["msg"]
    mr = result(tmp_path, td_task(td_name, "present", mr_config_id="q" * 64))
    assert mr["_status"] == "failed" and "MRCONFIGID none, not " in mr["msg"]
    assert not result(tmp_path, td_task(td_name, "present"))["changed"]  # as defined: unchanged


def test_a_start_the_preflight_refuses_fails_with_starts_line(tmp_path, qemu_conn, td_name, cc_off):
    assert result(tmp_path, td_task(td_name, "present"))["changed"]
    refused = result(tmp_path, td_task(td_name, "running"))
    assert refused["_status"] == "failed" and not refused["changed"]
    assert refused["msg"] == cli_error("start", td_name)
    assert "CC mode off" in refused["msg"] and state_of(qemu_conn, td_name) == "shut off"


def test_facts_are_the_clis_json(tmp_path, qemu_conn, td_name):
    assert result(tmp_path, td_task(td_name, "present"))["changed"]
    facts = result(tmp_path, {"tdxvirt.tdx.tdx_facts": {"sim": True}})
    assert facts["_status"] == "ok" and not facts["changed"]
    found = facts["ansible_facts"]
    cli_list = json.loads(run_sim("list", "--json").stdout)
    ours = next(r for r in found["tdxvirt_tds"] if r["name"] == td_name)
    assert ours == next(r for r in cli_list if r["name"] == td_name)
    assert ours["gpus"] == ["0000:38:00.0"] and ours["type"] == "TDX"
    cli_gpus = json.loads(run_sim("gpu", "list", "--json").stdout)
    strip = [{k: v for k, v in r.items() if k != "td"} for r in cli_gpus]  # others' TDs come and go
    assert [{k: v for k, v in r.items() if k != "td"} for r in found["tdxvirt_gpus"]] == strip
    assert td_name in found["tdxvirt_gpus"][0]["td"]
    check = run_sim("host", "check", "--json")
    cli_host = json.loads(check.stdout)
    assert [(c["name"], c["status"]) for c in found["tdxvirt_host"]["checks"]] == \
        [(c["name"], c["status"]) for c in cli_host["checks"]]
    assert found["tdxvirt_host"]["uri"] == cli_host["uri"]
    only = result(tmp_path, {"tdxvirt.tdx.tdx_facts": {"sim": True, "gather": ["tds"]}})
    assert set(only["ansible_facts"]) == {"tdxvirt_tds"}


def test_host_check_mode_on_the_simulated_host_is_setup_dry_run(tmp_path, sim):
    """Only check mode on the shared emulated host: a real setup would restart its daemon."""
    conf = sim.chroot / QEMU_CONF
    before = conf.read_bytes()
    dry = subprocess.run([str(Path(sys.executable).with_name("tdxvirt")), "--sim", "host", "setup",
                          "--dry-run"], capture_output=True, text=True, timeout=120, check=False)
    assert dry.returncode == 0, dry.stderr
    predicted = result(tmp_path, {"tdxvirt.tdx.tdx_host": {"sim": True}}, "--check", "--diff")
    assert predicted["_status"] == "ok"
    assert conf.read_bytes() == before
    if dry.stdout.startswith("Nothing to change"):
        assert not predicted["changed"] and "diff" not in predicted
    else:
        assert predicted["changed"]
        assert predicted["diff"]["prepared"] + "(dry run: nothing was changed)\n" == dry.stdout
        assert predicted["steps"] and predicted["steps"][0] == dry.stdout.splitlines()[0]


def _fake_host(tmp_path: Path, tdx: str = "Y") -> Path:
    """A Debian TDX host tree without systemd, its kernel arguments already set: setup
    writes files only (no program of the tree runs), so its real apply can run here."""
    base = debian_host(tmp_path / "root", systemd=False)
    grub = base / GRUB
    grub.write_text(re.sub(r'^GRUB_CMDLINE_LINUX=".*"$',
                           'GRUB_CMDLINE_LINUX="intel_iommu=on iommu=pt kvm_intel.tdx=on nohibernate"',
                           grub.read_text(), flags=re.M))
    (base / "sys/module/kvm_intel/parameters/tdx").write_text(f"{tdx}\n")
    return base


def test_host_apply_and_revert_on_a_fake_host_root(tmp_path):
    base = _fake_host(tmp_path, tdx="N")
    original = snapshot(base)

    def task(state="present", **options):
        return {"tdxvirt.tdx.tdx_host": {"host_root": str(base), "run_below_root": True,
                                         "state": state, **options}}

    # the CLI run by the module's Python: the hook setup writes names the Python running it
    dry = subprocess.run([sys.executable, "-c", "from tdxvirt.cli import main; main()",
                          "--host-root", str(base), "host", "setup", "--dry-run"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert dry.returncode == 0, dry.stderr
    predicted = result(tmp_path, task(), "--check", "--diff")
    assert predicted["changed"] and snapshot(base) == original
    assert predicted["diff"]["prepared"] + "(dry run: nothing was changed)\n" == dry.stdout
    assert predicted["reboot_required"]  # kvm_intel has tdx off: it reads tdx=on when it loads

    applied = result(tmp_path, task(), "--diff")
    assert applied["_status"] == "ok" and applied["changed"] and applied["reboot_required"]
    assert applied["steps"] == predicted["steps"]
    assert applied["diff"] == predicted["diff"]
    assert "options kvm_intel tdx=on" in (base / MODPROBE).read_text()
    assert 'security_driver = "none"' in (base / QEMU_CONF).read_text()
    set_up = snapshot(base)
    again = result(tmp_path, task())
    assert again["_status"] == "ok" and not again["changed"] and snapshot(base) == set_up

    check_revert = result(tmp_path, task("absent"), "--check")
    assert check_revert["changed"] and snapshot(base) == set_up
    reverted = result(tmp_path, task("absent"))
    assert reverted["_status"] == "ok" and reverted["changed"]
    assert snapshot(base) == original  # every byte back, backups gone
    assert not result(tmp_path, task("absent"))["changed"]

    refused = result(tmp_path, task(run_below_root=False))  # the tree's programs: asked for
    assert refused["_status"] == "failed" and "--run-below-root" in refused["msg"]
    assert snapshot(base) == original
    remote = result(tmp_path, {"tdxvirt.tdx.tdx_host": {"uri": "qemu+ssh://gpuhost/system"}})
    assert remote["_status"] == "failed" and remote["msg"].startswith("host setup changes the machine")


@pytest.fixture
def board(tmp_path):
    """A fake HGX board (8 H100s, 4 NVSwitches on vfio-pci) and the stand-in NVIDIA tool."""
    from gpu_fakes import StandinTool, build, hgx_devices

    root = build(tmp_path / "r", hgx_devices())
    return root, StandinTool(root, tmp_path)


def gpu_task(root, tool, sim_uri, **options) -> dict:
    from gpu_fakes import STANDIN

    return {"tdxvirt.tdx.tdx_gpu": {"uri": sim_uri, "host_root": str(root.base),
                                    "tool": str(STANDIN), **options},
            "environment": tool.env}


def test_gpu_cc_and_ppcie_modes_check_mode_first_then_twice(tmp_path, board, sim_uri):
    from gpu_fakes import HGX_GPUS, HGX_SWITCHES, STANDIN

    root, tool = board
    predicted = result(tmp_path, gpu_task(root, tool, sim_uri, gpus=[HGX_GPUS[0]], cc_mode="on"),
                       "--check", "--diff")
    assert predicted["_status"] == "ok" and predicted["changed"], predicted
    assert tool.state().get(HGX_GPUS[0], {}).get("cc", "off") == "off"  # a query records "off"
    assert not any("--set-cc-mode" in run for run in map(" ".join, tool.runs()))
    dry = subprocess.run([sys.executable, "-c", "from tdxvirt.cli import main; main()", "-c", sim_uri,
                          "--host-root", str(root.base), "gpu", "cc-mode", HGX_GPUS[0], "--set", "on",
                          "--dry-run", "--tool", str(STANDIN)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, **tool.env},
                         check=False)
    assert dry.returncode == 0, dry.stderr
    assert predicted["diff"]["prepared"] == dry.stdout

    done = result(tmp_path, gpu_task(root, tool, sim_uri, gpus=[HGX_GPUS[0]], cc_mode="on"))
    assert done["_status"] == "ok" and done["changed"]
    assert tool.state()[HGX_GPUS[0]]["cc"] == "on"
    assert [d["result"] for d in done["devices"]] == ["set on (was off), device reset"]
    again = result(tmp_path, gpu_task(root, tool, sim_uri, gpus=[HGX_GPUS[0]], cc_mode="on"))
    assert again["_status"] == "ok" and not again["changed"]
    assert [(d["address"], d["cc_mode"]) for d in again["devices"]] == [(HGX_GPUS[0], "on")]

    board_wide = result(tmp_path, gpu_task(root, tool, sim_uri, gpus=[HGX_GPUS[5]], ppcie="off"))
    assert board_wide["_status"] == "ok" and not board_wide["changed"], board_wide  # off already
    ppcie = result(tmp_path, gpu_task(root, tool, sim_uri, gpus=[HGX_GPUS[5]], ppcie="on"))
    assert ppcie["_status"] == "ok" and ppcie["changed"]
    assert all(tool.state()[a]["ppcie"] == "on" for a in HGX_GPUS + HGX_SWITCHES)
    assert not result(tmp_path, gpu_task(root, tool, sim_uri, gpus=[HGX_GPUS[5]], ppcie="on"))["changed"]


def test_gpu_bad_parameters_fail_in_tdxvirts_one_line(tmp_path, board, sim_uri):
    from gpu_fakes import HGX_GPUS, HGX_SWITCHES

    root, tool = board

    def cli(*args):
        done = subprocess.run([sys.executable, "-c", "from tdxvirt.cli import main; main()", "-c",
                               sim_uri, "--host-root", str(root.base), "gpu", *args],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, **tool.env}, check=False)
        assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        return done.stderr.strip().removeprefix("tdxvirt: error: ")

    both = result(tmp_path, gpu_task(root, tool, sim_uri, gpus=[HGX_GPUS[0]], cc_mode="on", ppcie="on"))
    assert both["_status"] == "failed"
    assert both["msg"] == cli("cc-mode", HGX_GPUS[0], "--set", "on", "--ppcie", "on")
    switch = result(tmp_path, gpu_task(root, tool, sim_uri, gpus=[HGX_SWITCHES[0]], cc_mode="on"))
    assert switch["_status"] == "failed" and "NVSwitch" in switch["msg"]
    assert switch["msg"] == cli("cc-mode", HGX_SWITCHES[0], "--set", "on", "--dry-run")
    missing = result(tmp_path, gpu_task(root, tool, sim_uri, gpus=["77:00.0"], driver="vfio"))
    assert missing["_status"] == "failed" and "\n" not in missing["msg"]
    assert missing["msg"] == cli("detach", "77:00.0", "--dry-run")
    remote = result(tmp_path, gpu_task(root, tool, "qemu+ssh://gpuhost/system", cc_mode="on"))
    assert remote["_status"] == "failed" and "names another host" in remote["msg"]
    assert not any("--set-" in run for run in map(" ".join, tool.runs()))  # nothing was set


def test_gpu_on_the_simulated_host_is_left_as_it_is(tmp_path, sim, cc_on):
    """The emulated host's H100 is on vfio-pci and (cc_on) in CC mode: asked for both,
    nothing moves or switches, in check mode or not."""
    task = {"tdxvirt.tdx.tdx_gpu": {"sim": True, "gpus": ["all"], "driver": "vfio", "cc_mode": "on"}}
    runs = Path(sim.gpu_tool_env["STANDIN_RECORD"])
    seen = runs.read_text() if runs.exists() else ""
    for flags in (("--check", "--diff"), ()):
        answer = result(tmp_path, task, *flags)
        assert answer["_status"] == "ok" and not answer["changed"], answer
        assert [(d["address"], d["cc_mode"]) for d in answer["devices"]] == [("0000:38:00.0", "on")]
        assert "diff" not in answer
    now = runs.read_text() if runs.exists() else ""
    assert "--set-cc-mode" not in now[len(seen):]  # only queries ran


def test_attest_fails_the_task_with_tdxvirts_line(tmp_path, qemu_conn, td_name, cc_on):
    """The emulated host runs QEMU without tdx-guest: no TD there can pass attestation."""
    def attest(**options):
        return result(tmp_path, {"tdxvirt.tdx.tdx_attest": {"name": td_name, "sim": True,
                                                            "timeout": 2, **options}})

    unknown = attest()
    assert unknown["_status"] == "failed" and not unknown["changed"]
    assert unknown["msg"] == cli_error("guest", "attest", td_name, "--timeout", "2")
    assert result(tmp_path, td_task(td_name, "present"))["changed"]
    stopped = attest()
    assert stopped["_status"] == "failed" and "is not running" in stopped["msg"]
    assert stopped["msg"] == cli_error("guest", "attest", td_name, "--timeout", "2")
    bad_url = attest(pccs_url="pccs.example")
    assert bad_url["_status"] == "failed" and "http(s)://" in bad_url["msg"]

    assert result(tmp_path, td_task(td_name, "running"))["changed"]
    running = attest()  # no guest OS, so no agent: the quote cannot even be asked for
    assert running["_status"] == "failed" and "\n" not in running["msg"], running
    assert running["msg"] == cli_error("guest", "attest", td_name, "--timeout", "2")
    assert state_of(qemu_conn, td_name) == "running"  # attesting changed nothing


def test_the_docs_playbook_runs_in_check_mode_on_the_simulated_host(tmp_path, qemu_conn, sim, cc_on):
    """docs/ansible.md's playbook (the file, verbatim in the page) on the emulated host in
    check mode: every task passes and predicts, nothing is defined or set up (attestation
    needs the TD it would define: skipped by its tag)."""
    book = REPO / "ansible_collections/tdxvirt/tdx/playbooks/gpu_tds.yml"
    assert f"```yaml\n{book.read_text()}```" in (REPO / "docs/ansible.md").read_text()
    name = f"ans-{uuid.uuid4().hex[:8]}"
    conf = (sim.chroot / QEMU_CONF).read_bytes()
    record = tmp_path / "book.jsonl"
    tds = [{"name": name, "gpus": ["38:00.0"], "memory": "1G", "vcpus": 1, "allow_shared": True}]
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(REPO),
           "ANSIBLE_CALLBACK_PLUGINS": str(CALLBACKS), "ANSIBLE_CALLBACKS_ENABLED": "record_results",
           "TDXVIRT_ANSIBLE_RECORD": str(record), "ANSIBLE_HOME": str(tmp_path / "home"),
           "ANSIBLE_REMOTE_TMP": str(tmp_path / "remote-tmp"), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([str(PLAYBOOK), "-i", "localhost,", "-c", "local", "--check", "--diff",
                           "--skip-tags", "attest", "-e", f"ansible_python_interpreter={sys.executable}",
                           "-e", json.dumps({"tdx_hosts": "localhost", "tdx_become": False,
                                             "tdx_sim": True, "tdx_tds": tds}), str(book)],
                          capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    results = {r["task"]: r for r in map(json.loads, record.read_text().splitlines())}
    assert all(r["status"] in ("ok", "skipped") for r in results.values()), results
    assert results["The TDs, defined and running"]["result"]["changed"]
    assert results["Every GPU on vfio-pci, in CC mode"]["status"] == "ok"
    assert name not in names(qemu_conn) and (sim.chroot / QEMU_CONF).read_bytes() == conf
