"""Issue #18: what a root-run tdxvirt trusts from the environment and config files.

``$TDXVIRT_GPU_TOOLS``, ``$TDXVIRT_STATE_DIR``, ``$TDXVIRT_CONFIG``,
``$TDXVIRT_SCHEMA_DIR`` and a user's ``~/.config/tdxvirt/config.toml`` (all kept by
``sudo -E``) choose what root runs, reads and writes. Tests run as root, so each
path someone else could change is refused with one line; the simulator's own paths
(the stand-in tool in the checkout, /var/lib/tdxvirt) still pass; a user other than
root sees no change.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from gpu_fakes import STANDIN
from test_sec_host_root import UNREACHABLE, invoke, one_line_error

from tdxvirt.config import Config, load_config
from tdxvirt.errors import HostNotReadyError, InputError
from tdxvirt.gpu import admin_tool
from tdxvirt.paths import schema_dirs, state_dir
from tdxvirt.sim.hostroot import build_host_root

NOBODY = 65534
CONFIG = '[defaults]\nqemu = "/opt/evil/qemu"\n'
HOSTILE_TOOL = """import pathlib
pathlib.Path(__file__).with_name("tdxvirt-pwned").write_text("ran as root")
"""
TRUST = ("tdxvirt runs as root and uses only paths that root owns and no group or other "
         "user can change")


def directory(path: Path, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    return path


def config_file(folder: Path, mode: int = 0o644) -> Path:
    path = directory(folder) / "config.toml"
    path.write_text(CONFIG)
    path.chmod(mode)
    return path


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in ("TDXVIRT_CONFIG", "TDXVIRT_GPU_TOOLS", "TDXVIRT_STATE_DIR",
                 "TDXVIRT_SCHEMA_DIR"):
        monkeypatch.delenv(name, raising=False)


# --- config files --------------------------------------------------------------------------

def test_a_root_owned_config_file_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("TDXVIRT_CONFIG", str(config_file(tmp_path / "etc")))
    assert load_config() == Config(qemu="/opt/evil/qemu")


def test_a_config_file_in_a_sticky_directory_is_read(tmp_path, monkeypatch):
    """Like /tmp: others cannot rename or replace root's entries there."""
    monkeypatch.setenv("TDXVIRT_CONFIG", str(config_file(directory(tmp_path / "t", 0o1777))))
    assert load_config() == Config(qemu="/opt/evil/qemu")


@pytest.mark.parametrize("spoil", ["group-writable file", "file not root's",
                                   "group-writable directory"])
def test_config_file_others_can_change_is_refused(tmp_path, monkeypatch, spoil):
    path = config_file(tmp_path / "etc")
    if spoil == "group-writable file":
        path.chmod(0o664)
        culprit, fault, fix = path, "is writable by its group or others", f"chmod go-w {path}"
    elif spoil == "file not root's":
        os.chown(path, NOBODY, NOBODY)
        culprit, fault, fix = path, f"is owned by uid {NOBODY}, not root", f"chown root {path}"
    else:
        path.parent.chmod(0o775)
        culprit, fault, fix = (path.parent, "is writable by its group or others",
                               f"chmod go-w {path.parent}")
    monkeypatch.setenv("TDXVIRT_CONFIG", str(path))
    with pytest.raises(InputError) as caught:
        load_config()
    assert str(caught.value) == (f"config file {path}: {culprit} {fault}; {TRUST}: `{fix}`, "
                                 "or unset TDXVIRT_CONFIG")


def test_a_users_config_kept_by_sudo_e_is_refused(tmp_path, monkeypatch):
    home = directory(tmp_path / "home")
    path = config_file(home / ".config/tdxvirt")
    for owned in (home, home / ".config", home / ".config/tdxvirt", path):
        os.chown(owned, NOBODY, NOBODY)
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(InputError) as caught:
        load_config()
    assert str(caught.value) == (
        f"config file {path}: {home} is owned by uid {NOBODY}, not root; {TRUST}: "
        f"`chown root {home}`, or run sudo without -E (it keeps your HOME, and so your own "
        "config file)")


def test_define_refuses_a_group_writable_config_in_one_line(sim_uri, gpu_host, tmp_path,
                                                            monkeypatch):
    host, gpu = gpu_host
    path = config_file(tmp_path / "etc", 0o664)
    monkeypatch.setenv("TDXVIRT_CONFIG", str(path))
    result = invoke("-c", sim_uri, "--host-root", str(host.base), "define", "--gpu", gpu,
                    "--print-xml")
    line = one_line_error(result, 2)
    assert line == (f"tdxvirt: error: config file {path}: {path} is writable by its group or "
                    f"others; {TRUST}: `chmod go-w {path}`, or unset TDXVIRT_CONFIG")
    assert "/opt/evil/qemu" not in result.stdout


# --- the GPU tool --------------------------------------------------------------------------

def hostile_tool(folder: Path, mode: int = 0o755, dir_mode: int = 0o755) -> Path:
    path = directory(folder, dir_mode) / "nvidia_gpu_tools.py"
    path.write_text(HOSTILE_TOOL)
    path.chmod(mode)
    return path


def ran(tool: Path) -> bool:
    return tool.with_name("tdxvirt-pwned").exists()


def test_the_simulators_stand_in_is_trusted(monkeypatch):
    monkeypatch.setenv("TDXVIRT_GPU_TOOLS", str(STANDIN))
    assert admin_tool.locate().argv == (sys.executable, str(STANDIN))


@pytest.mark.parametrize("spoil", ["group-writable", "not root's", "sticky directory",
                                   "writable sibling module"])
def test_gpu_tools_others_can_change_are_refused_in_one_line(sim_uri, tmp_path, monkeypatch,
                                                            spoil):
    root = build_host_root(tmp_path / "root")
    tool = hostile_tool(tmp_path / "tool")
    if spoil == "group-writable":
        tool.chmod(0o775)
        culprit, fix = f"{tool} is writable by its group or others", f"chmod go-w {tool}"
    elif spoil == "not root's":
        os.chown(tool, NOBODY, NOBODY)
        culprit, fix = f"{tool} is owned by uid {NOBODY}, not root", f"chown root {tool}"
    elif spoil == "sticky directory":  # anyone could plant a module the script imports
        tool.parent.chmod(0o1777)
        culprit, fix = (f"{tool.parent} is writable by its group or others",
                        f"chmod go-w {tool.parent}")
    else:
        sibling = tool.with_name("gpu.py")
        sibling.write_text("")
        sibling.chmod(0o666)
        culprit, fix = (f"{sibling} is writable by its group or others",
                        f"chmod go-w {sibling}")
    monkeypatch.setenv("TDXVIRT_GPU_TOOLS", str(tool))
    result = invoke("-c", sim_uri, "--host-root", str(root.base), "gpu", "list", "--modes")
    line = one_line_error(result, 1)
    assert line == (f"tdxvirt: error: NVIDIA GPU tool ($TDXVIRT_GPU_TOOLS) {tool}: {culprit}; "
                    f"{TRUST}: `{fix}`, or unset TDXVIRT_GPU_TOOLS (sudo -E keeps it)")
    assert not ran(tool)


def test_tool_option_is_held_to_the_same_rule(sim_uri, tmp_path):
    root = build_host_root(tmp_path / "root")
    tool = hostile_tool(tmp_path / "tool", mode=0o777)
    result = invoke("-c", sim_uri, "--host-root", str(root.base), "gpu", "list", "--modes",
                    "--tool", str(tool))
    line = one_line_error(result, 1)
    assert line.startswith(f"tdxvirt: error: NVIDIA GPU tool {tool}: {tool} is "
                           "writable by its group or others;")
    assert line.endswith(", or give a tool root owns")
    assert not ran(tool)


def test_nvtrust_checkout_others_can_change_is_refused(tmp_path):
    checkout = directory(tmp_path / "nvtrust", 0o775)
    script = hostile_tool(checkout / "host_tools/python")
    with pytest.raises(HostNotReadyError, match=f"{checkout} is writable by its group"):
        admin_tool.locate(str(checkout))
    checkout.chmod(0o755)
    assert admin_tool.locate(str(checkout)).argv == (sys.executable, str(script))
    assert not ran(script)


def test_host_check_reports_a_refused_tool_and_never_runs_it(tmp_path, monkeypatch):
    root = build_host_root(tmp_path / "root")
    tool = hostile_tool(tmp_path / "tool", mode=0o666)
    monkeypatch.setenv("TDXVIRT_GPU_TOOLS", str(tool))
    result = invoke("-c", UNREACHABLE, "--host-root", str(root.base), "host", "check", "--json")
    rows = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    row = rows["gpu 0000:38:00.0: cc mode"]
    assert row["status"] == "fail"
    assert row["found"].startswith(f"not read: NVIDIA GPU tool ($TDXVIRT_GPU_TOOLS) {tool}: "
                                   f"{tool} is writable by its group or others")
    assert not ran(tool)


# --- the state and schema directories ------------------------------------------------------

def test_the_simulators_state_dir_is_trusted(monkeypatch):
    monkeypatch.setenv("TDXVIRT_STATE_DIR", "/var/lib/tdxvirt")
    assert state_dir() == Path("/var/lib/tdxvirt")


def test_a_state_dir_others_can_write_is_refused(tmp_path, monkeypatch):
    state = directory(tmp_path / "state", 0o777)
    monkeypatch.setenv("TDXVIRT_STATE_DIR", str(state))
    with pytest.raises(InputError) as caught:
        state_dir()
    assert str(caught.value) == (f"TDXVIRT_STATE_DIR {state}: {state} is writable by its group "
                                 f"or others; {TRUST}: `chmod go-w {state}`, or unset "
                                 "TDXVIRT_STATE_DIR")
    line = one_line_error(invoke("build", "status"), 2)
    assert line == f"tdxvirt: error: {caught.value}"


def test_a_missing_state_dir_needs_a_parent_only_root_can_write(tmp_path, monkeypatch):
    fine = directory(tmp_path / "fine") / "state"
    monkeypatch.setenv("TDXVIRT_STATE_DIR", str(fine))
    assert state_dir() == fine
    # Below a sticky directory (like /tmp) someone else could create it first.
    sticky = directory(tmp_path / "sticky", 0o1777) / "state"
    monkeypatch.setenv("TDXVIRT_STATE_DIR", str(sticky))
    with pytest.raises(InputError, match=f"{sticky.parent} is writable by its group or others"):
        state_dir()


def test_schema_dirs_others_can_change_are_refused(tmp_path, monkeypatch):
    schemas = directory(tmp_path / "schemas")
    (schemas / "domain.rng").write_text("<grammar/>")
    monkeypatch.setenv("TDXVIRT_SCHEMA_DIR", str(schemas))
    assert schema_dirs()[0] == schemas
    (schemas / "domain.rng").chmod(0o666)
    with pytest.raises(InputError, match=r"TDXVIRT_SCHEMA_DIR schema .*domain.rng is writable"):
        schema_dirs()
    (schemas / "domain.rng").chmod(0o644)
    schemas.chmod(0o775)
    with pytest.raises(InputError, match=f"TDXVIRT_SCHEMA_DIR {schemas}: {schemas} is writable"):
        schema_dirs()


# --- another user: nothing changes ---------------------------------------------------------

_AS_NOBODY = """
import os, sys, tomllib  # tomllib: config.py imports it only when a file is there
from tdxvirt.config import load_config
from tdxvirt.gpu import admin_tool
from tdxvirt.paths import schema_dirs, state_dir
# Python lives under /root here, which an ordinary user cannot read: import first.
os.setgroups([]); os.setgid(65534); os.setuid(65534)
print(load_config().qemu)
print(admin_tool.locate().origin)
print(state_dir())
print(schema_dirs()[0])
"""


def test_a_user_other_than_root_sees_no_change():
    shared = Path(tempfile.mkdtemp(prefix="tdxvirt-trust-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        open_to_all = directory(shared / "open", 0o777)
        config = config_file(open_to_all, 0o666)
        tool = hostile_tool(open_to_all, mode=0o777, dir_mode=0o777)
        env = {**os.environ, "TDXVIRT_CONFIG": str(config), "TDXVIRT_GPU_TOOLS": str(tool),
               "TDXVIRT_STATE_DIR": str(open_to_all / "state"),
               "TDXVIRT_SCHEMA_DIR": str(open_to_all)}
        done = subprocess.run([sys.executable, "-c", _AS_NOBODY], capture_output=True,
                              text=True, env=env)
    finally:
        shutil.rmtree(shared)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["/opt/evil/qemu", str(tool), str(open_to_all / "state"),
                                        str(open_to_all)]


def test_dot_dot_after_a_link_is_judged_where_the_kernel_goes(tmp_path, monkeypatch):
    """`safe/link/../config.toml` opens the file beside the link's target, not
    `safe/config.toml`: that is the one judged."""
    config_file(tmp_path / "safe")  # the decoy a lexical check would look at
    evil = config_file(tmp_path / "evil").parent
    directory(evil / "sub")
    evil.chmod(0o777)
    (tmp_path / "safe/link").symlink_to(evil / "sub")
    monkeypatch.setenv("TDXVIRT_CONFIG", str(tmp_path / "safe/link/../config.toml"))
    with pytest.raises(InputError, match=f": {evil} is writable by its group or others;"):
        load_config()
