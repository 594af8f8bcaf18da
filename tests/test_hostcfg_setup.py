"""host setup end to end on fake host roots made of real Debian files.

Commands (update-grub, grubby, systemctl, udevadm) go to a recording stand-in; every
file write is real, below a temporary root.
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
from click.testing import CliRunner
from test_hostcfg_kernelargs import GRUBBY_INFO
from test_hostcfg_realfiles import augeas_load, grub_defaults, shipped_lenses, shipped_qemu_conf

from tdxvirt.cli import main
from tdxvirt.cli.host import host
from tdxvirt.errors import HostNotReadyError
from tdxvirt.host.commands import RecordingRunner
from tdxvirt.hostcfg import apply
from tdxvirt.hostcfg.plan import render
from tdxvirt.hostcfg.qemuconf import QemuConf, QemuConfSyntaxError
from tdxvirt.hostcfg.setup import SetupOptions, revert, setup
from tdxvirt.sim.hostroot import build_host_root

if "host" not in main.commands:
    main.add_command(host)

QEMU_CONF = "etc/libvirt/qemu.conf"
GRUB = "etc/default/grub"
MODPROBE = "etc/modprobe.d/tdxvirt.conf"
UDEV = "etc/udev/rules.d/70-tdxvirt-vfio.rules"
LIBVIRTD_PID = 4242
# As Debian's libvirt-daemon-system creates them (adduser in its postinst).
DEBIAN_ACCOUNTS = ("libvirt-qemu:x:64055:993:Libvirt Qemu,,,:/var/lib/libvirt:/usr/sbin/nologin\n",
                   "kvm:x:993:libvirt-qemu\nlibvirt-qemu:x:64055:libvirt-qemu\n")


def debian_host(base: Path, systemd: bool = True, grubby: bool = False, devices=None) -> Path:
    """A Debian TDX host: the real qemu.conf and /etc/default/grub, libvirtd running."""
    build_host_root(base, **({"devices": devices} if devices is not None else {}))
    etc = base / "etc"
    for directory in ("libvirt", "default", "modprobe.d", "udev/rules.d"):
        (etc / directory).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shipped_qemu_conf(), base / QEMU_CONF)
    os.chmod(base / QEMU_CONF, 0o600)  # as Debian installs it (it can hold passwords)
    shutil.copyfile(grub_defaults(), base / GRUB)
    shutil.copyfile("/etc/os-release", etc / "os-release")
    (etc / "passwd").write_text(Path("/etc/passwd").read_text() + DEBIAN_ACCOUNTS[0])
    (etc / "group").write_text(Path("/etc/group").read_text() + DEBIAN_ACCOUNTS[1])
    tools = base / "usr/sbin"
    tools.mkdir(parents=True, exist_ok=True)
    # Presence marks only: the commands themselves go to the recording runner.
    for tool in ("update-grub", "libvirtd") + (("grubby",) if grubby else ()):
        (tools / tool).write_text("#!/bin/sh\n")
    if systemd:
        (base / "run/systemd/system").mkdir(parents=True)
    proc = base / "proc" / str(LIBVIRTD_PID)
    proc.mkdir(parents=True)
    (proc / "comm").write_text("libvirtd\n")
    # Fields 10-21 (faults, times, priority, nice, threads, itrealvalue), then field 22:
    # started 500 clock ticks (5 s) after boot.
    (proc / "stat").write_text(f"{LIBVIRTD_PID} (libvirtd) S 1 4242 4242 0 -1 4194560 "
                               "812 0 3 0 12 8 0 0 20 0 17 0 500 1523712000 4012\n")
    (base / "proc/stat").write_text("cpu  1 2 3 4\nbtime 1700000000\n")
    return base


def snapshot(base: Path) -> dict[str, bytes]:
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*"))
            if p.is_file() and not p.is_symlink()}


@pytest.fixture
def debian(tmp_path):
    base = debian_host(tmp_path / "root")
    from tdxvirt.host import HostRoot

    return HostRoot(base), base


def _setup(root, runner=None, echo=None, **options):
    runner = runner or RecordingRunner()
    shown = []
    plan = setup(root, runner, SetupOptions(**options), echo or shown.append)
    return plan, runner, shown


def test_setup_applies_everything_once_and_revert_restores_every_byte(debian, tmp_path):
    root, base = debian
    before = snapshot(base)
    plan, runner, shown = _setup(root)
    assert shown == list(plan.steps)  # each step shown before it is done
    assert runner.calls == [["update-grub"], ["systemctl", "restart", "libvirtd.service"]]

    conf = QemuConf.parse((base / QEMU_CONF).read_bytes())
    assert {k: conf.get(k) for k in ("user", "group", "dynamic_ownership", "security_driver")} \
        == {"user": "libvirt-qemu", "group": "libvirt-qemu", "dynamic_ownership": 0,
            "security_driver": "none"}
    assert (base / QEMU_CONF).stat().st_mode & 0o777 == 0o600
    assert augeas_load((base / QEMU_CONF).read_bytes(), shipped_lenses(), tmp_path)["user"] == \
        "libvirt-qemu"
    assert "options kvm_intel tdx=on" in (base / MODPROBE).read_text()
    assert 'GRUB_CMDLINE_LINUX="intel_iommu=on iommu=pt kvm_intel.tdx=on nohibernate"' in \
        (base / GRUB).read_text()
    kinds = [n.kind for n in plan.notices]
    assert kinds == ["warning", "reboot"]  # sVirt off; kernel command line changed
    manifest = json.loads((base / apply.MANIFEST.lstrip("/")).read_text())
    assert sorted(manifest["files"]) == ["/etc/default/grub", "/etc/libvirt/hooks/qemu.d/tdxvirt",
                                         "/etc/libvirt/qemu.conf", "/etc/modprobe.d/tdxvirt.conf"]
    hook = base / "etc/libvirt/hooks/qemu.d/tdxvirt"
    assert hook.stat().st_mode & 0o777 == 0o755 and hook.read_bytes().startswith(b"#!")
    assert manifest["files"]["/etc/modprobe.d/tdxvirt.conf"]["existed"] is False

    changed = snapshot(base)
    again, runner2, _ = _setup(root)
    assert again.changes == () and runner2.calls == []
    assert snapshot(base) == changed

    runner3 = RecordingRunner()
    undone = revert(root, runner3, lambda step: None)
    assert runner3.calls == [["update-grub"], ["systemctl", "restart", "libvirtd.service"]]
    assert snapshot(base) == before  # backups and manifest gone too
    assert revert(root, RecordingRunner(), lambda step: None).changes == ()
    assert any(n.kind == "reboot" for n in undone.notices)


def test_dry_run_shows_diffs_and_commands_and_changes_nothing(debian):
    root, base = debian
    before = snapshot(base)
    runner = RecordingRunner()
    plan = setup(root, runner, SetupOptions(user="root", group="kvm"), lambda s: None,
                 dry_run=True)
    assert snapshot(base) == before and runner.calls == []
    text = render(plan)
    assert "edit /etc/libvirt/qemu.conf: run QEMU as root:kvm" in text
    assert '--- a/etc/libvirt/qemu.conf\n+++ b/etc/libvirt/qemu.conf\n' in text
    assert '-#user = "libvirt-qemu"\n+user = "root"\n' in text
    assert "--- /dev/null\n+++ b/etc/modprobe.d/tdxvirt.conf\n" in text
    assert "run `update-grub`" in text and "run `systemctl restart libvirtd.service`" in text
    assert "warning: security_driver = \"none\" turns off sVirt" in text


def test_keep_security_driver_installs_udev_rules_instead(debian):
    root, base = debian
    plan, runner, _ = _setup(root, security_driver="keep", group="kvm")
    conf = QemuConf.parse((base / QEMU_CONF).read_bytes())
    assert conf.get("security_driver") is None and conf.get("dynamic_ownership") == 0
    rules = (base / UDEV).read_text()
    assert 'SUBSYSTEM=="vfio-dev", GROUP="kvm", MODE="0660"' in rules
    assert 'SUBSYSTEM=="misc", KERNEL=="iommu", GROUP="kvm", MODE="0660"' in rules
    assert runner.calls[1:] == [
        ["systemctl", "restart", "libvirtd.service"],
        ["udevadm", "control", "--reload-rules"],
        ["udevadm", "trigger", "--subsystem-match=vfio", "--subsystem-match=vfio-dev"],
        ["udevadm", "trigger", "--subsystem-match=misc", "--sysname-match=vfio",
         "--sysname-match=iommu"]]
    assert not any("sVirt" in n.text for n in plan.notices)
    assert _setup(root, security_driver="keep", group="kvm")[0].changes == ()


def test_without_systemd_it_says_what_to_restart(tmp_path):
    from tdxvirt.host import HostRoot

    root = HostRoot(debian_host(tmp_path / "root", systemd=False))
    plan, runner, _ = _setup(root)
    assert runner.calls == [["update-grub"]]
    advice = [n.text for n in plan.notices if "restart libvirtd" in n.text]
    assert advice and f"(pid {LIBVIRTD_PID})" in advice[0] and "no systemd" in advice[0]


def test_grubby_hosts_get_grubby_and_revert_removes_the_args(tmp_path):
    from tdxvirt.host import HostRoot

    base = debian_host(tmp_path / "root", grubby=True)
    (base / GRUB).unlink()  # a BLS host: grubby edits the entries
    root = HostRoot(base)
    runner = RecordingRunner(replies={("grubby", "--info=ALL"): (0, GRUBBY_INFO, "")})
    _setup(root, runner)
    # The rescue kernel lacks intel_iommu=on too; the first kernel already had it.
    add = ["grubby", "--update-kernel=ALL",
           "--args=intel_iommu=on iommu=pt kvm_intel.tdx=on nohibernate"]
    assert runner.calls[:2] == [["grubby", "--info=ALL"], add]
    updated = GRUBBY_INFO.replace('args="ro rootflags=subvol=root"',
                                  'args="ro rootflags=subvol=root intel_iommu=on iommu=pt '
                                  'kvm_intel.tdx=on nohibernate"')
    updated = updated.replace("intel_iommu=on\"", "intel_iommu=on iommu=pt kvm_intel.tdx=on "
                              "nohibernate\"")
    runner2 = RecordingRunner(replies={("grubby", "--info=ALL"): (0, updated, "")})
    assert _setup(root, runner2)[0].changes == ()
    runner3 = RecordingRunner(replies={("grubby", "--info=ALL"): (0, updated, "")})
    revert(root, runner3, lambda s: None)
    # intel_iommu=on stays: a kernel booted with it before setup.
    assert ["grubby", "--update-kernel=ALL",
            "--remove-args=iommu=pt kvm_intel.tdx=on nohibernate"] in runner3.calls


def test_unknown_distribution_says_what_it_cannot_do(tmp_path):
    from tdxvirt.host import HostRoot

    base = tmp_path / "root"
    build_host_root(base)
    (base / "etc").mkdir()
    (base / "etc/os-release").write_text('ID=plan9\nPRETTY_NAME="Plan 9 from Bell Labs"\n')
    (base / "etc/passwd").write_text("root:x:0:0::/:/bin/rc\n")  # no QEMU user either
    (base / "etc/group").write_text("root:x:0:\n")
    plan, runner, _ = _setup(HostRoot(base))
    cannot = [n.text for n in plan.notices if n.kind == "cannot"]
    assert len(cannot) == 3 and plan.changes == () and runner.calls == []
    assert "cannot write /etc/modprobe.d/tdxvirt.conf on Plan 9 from Bell Labs" in cannot[0]
    assert "cannot set kernel arguments on Plan 9 from Bell Labs: no grubby and no " \
           "/etc/default/grub" in cannot[1]
    assert "cannot edit /etc/libvirt/qemu.conf: it does not exist" in cannot[2]
    result = CliRunner().invoke(main, ["--host-root", str(base), "host", "setup", "--dry-run"])
    assert result.exit_code == 1 and "3 step(s) could not be done" in result.stderr


def test_a_failing_command_puts_the_files_back(debian):
    root, base = debian
    before = snapshot(base)
    runner = RecordingRunner(replies={("update-grub",): (1, "", "grub-probe: error: "
                                                         "failed to get canonical path")})
    with pytest.raises(HostNotReadyError) as caught:
        _setup(root, runner)
    message = str(caught.value)
    assert message.startswith("`update-grub` failed (exit 1): grub-probe: error:")
    assert "tdxvirt put back /etc/libvirt/hooks/qemu.d/tdxvirt, /etc/libvirt/qemu.conf, " \
           "/etc/default/grub, /etc/modprobe.d/tdxvirt.conf" in message
    assert snapshot(base) == before


def test_a_file_changed_meanwhile_stops_the_run_and_rolls_back(debian):
    root, base = debian
    before = snapshot(base)

    def someone_edits_qemu_conf(step):
        if getattr(step, "path", None) == "/etc/libvirt/qemu.conf":
            with open(base / QEMU_CONF, "ab") as conf:
                conf.write(b"# edited by someone else\n")

    with pytest.raises(HostNotReadyError, match="qemu.conf changed while tdxvirt was planning"):
        _setup(root, echo=someone_edits_qemu_conf)
    after = snapshot(base)
    assert after.pop(QEMU_CONF).endswith(b"# edited by someone else\n")
    before.pop(QEMU_CONF)
    assert after == before


_DISK_FULL = """
import resource, signal, sys
from tdxvirt.host import HostRoot
from tdxvirt.host.commands import RecordingRunner
from tdxvirt.hostcfg.setup import SetupOptions, setup
from tdxvirt.errors import HostNotReadyError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))  # qemu.conf's backup will not fit
try:
    setup(HostRoot(sys.argv[1]), RecordingRunner(), SetupOptions(), lambda s: None)
except HostNotReadyError as error:
    print(error)
    sys.exit(3)
"""


def test_running_out_of_disk_halfway_leaves_the_host_as_it_was(debian):
    root, base = debian
    before = snapshot(base)
    done = subprocess.run([sys.executable, "-c", _DISK_FULL, str(base)],
                          capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    assert "File too large" in done.stdout and "tdxvirt put back" in done.stdout
    assert snapshot(base) == before


def test_malformed_qemu_conf_is_refused_before_anything_changes(debian):
    root, base = debian
    with open(base / QEMU_CONF, "ab") as conf:
        conf.write(b'user = "root"\nuser = "qemu"\n')
    before = snapshot(base)
    with pytest.raises(QemuConfSyntaxError) as caught:
        _setup(root)
    lines = (base / QEMU_CONF).read_bytes().count(b"\n")
    assert str(caught.value) == (f"/etc/libvirt/qemu.conf line {lines}: 'user' is set twice "
                                 f"(also on line {lines - 1}); remove one of them; fix the "
                                 "file by hand (tdxvirt changed nothing)")
    assert snapshot(base) == before


def test_revert_leaves_a_file_someone_changed_since(debian):
    root, base = debian
    original_grub = (base / GRUB).read_bytes()
    _setup(root)
    with open(base / QEMU_CONF, "ab") as conf:
        conf.write(b"max_files = 4096\n")
    plan = revert(root, RecordingRunner(), lambda s: None)
    assert any("qemu.conf changed since tdxvirt wrote it; left as it is" in n.text
               for n in plan.notices)
    assert (base / GRUB).read_bytes() == original_grub
    assert b"max_files = 4096" in (base / QEMU_CONF).read_bytes()
    manifest = json.loads((base / apply.MANIFEST.lstrip("/")).read_text())
    assert list(manifest["files"]) == ["/etc/libvirt/qemu.conf"]  # its backup is kept


def test_unknown_user_is_refused(debian):
    root, base = debian
    before = snapshot(base)
    with pytest.raises(Exception, match=r"no user 'nosuchuser' on this host \(/etc/passwd\)"):
        _setup(root, user="nosuchuser")
    assert snapshot(base) == before


def test_cli_dry_run_and_refusals(debian):
    _, base = debian
    before = snapshot(base)
    result = CliRunner().invoke(main, ["--host-root", str(base), "host", "setup", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "+++ b/etc/libvirt/qemu.conf" in result.stdout
    assert result.stdout.rstrip().endswith("(dry run: nothing was changed)")
    assert snapshot(base) == before
    remote = CliRunner().invoke(main, ["-c", "qemu+ssh://gpuhost/system", "--host-root",
                                       str(base), "host", "setup", "--dry-run"])
    assert remote.exit_code == 2 and "names another host" in remote.stderr
    mixed = CliRunner().invoke(main, ["--host-root", str(base), "host", "setup", "--revert",
                                      "--user", "root"])
    assert mixed.exit_code == 2 and "--revert takes no other setup options" in mixed.stderr


_NOT_ROOT = """
import os, sys
from tdxvirt.cli import main
from tdxvirt.cli.host import host
import tdxvirt.doctor.context, tdxvirt.host.commands, tdxvirt.hostcfg.setup  # noqa: E401
main.add_command(host)
# Python lives under /root here, which an ordinary user cannot read: import first, then
# become that user.
os.setgroups([]); os.setgid(65534); os.setuid(65534)
sys.argv = ["tdxvirt", "--host-root", sys.argv[1], "host", "setup"]
main()
"""


def test_not_root_changes_nothing_and_says_so():
    shared = Path(tempfile.mkdtemp(prefix="tdxvirt-setup-", dir="/tmp"))
    os.chmod(shared, 0o755)  # pytest's tmp_path is root-only; nobody must reach the root
    base = debian_host(shared / "root")
    before = snapshot(base)
    try:
        done = subprocess.run([sys.executable, "-c", _NOT_ROOT, str(base)],
                              capture_output=True, text=True)
    finally:
        after = snapshot(base)
        shutil.rmtree(shared)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "tdxvirt: error: tdxvirt host setup changes files in /etc and restarts libvirt: run "
        "it as root (sudo); `--dry-run` shows what it would do without root")
    assert after == before


def test_modprobe_file_only_when_needed_and_legacy_vfio_option(debian):
    root, base = debian
    (base / "etc/modprobe.d/tdx.conf").write_text("options kvm_intel tdx=on\n")  # the source doc's
    _setup(root)
    # another file already loads kvm_intel with TDX: tdxvirt's only keeps the drivers that
    # would take the host's H100 off it
    assert (base / MODPROBE).read_text().splitlines()[1:] == [
        "# Host drivers that would take the TDs' NVIDIA GPUs (nova_core: after the",
        "# reset that applies a GPU's CC mode).", "blacklist nouveau", "blacklist nova_core"]
    (base / MODPROBE).unlink()
    (base / "etc/modprobe.d/local-blacklist.conf").write_text("blacklist nouveau\nblacklist nova-core\n")
    _setup(root)
    assert not (base / MODPROBE).exists()  # other files already do it all
    (base / "etc/modprobe.d/zz-local.conf").write_text("options kvm_intel tdx=0\n")
    plan, _, _ = _setup(root, legacy_vfio=True)
    assert (base / MODPROBE).read_text().splitlines()[2:] == [
        "options kvm_intel tdx=on",
        "# Legacy VFIO: enough DMA mappings for large TDs with GPUs (Canonical's value).",
        "options vfio_iommu_type1 dma_entry_limit=2097152"]
    assert [n.text for n in plan.notices if n.kind == "warning"][0] == (
        "/etc/modprobe.d/zz-local.conf sets kvm_intel tdx=0 and is read after "
        "/etc/modprobe.d/tdxvirt.conf, so it wins: remove that option")


def test_module_reload_is_a_reboot_when_kvm_has_tdx_off(debian):
    root, base = debian
    _setup(root)  # kernel arguments done
    (base / MODPROBE).unlink()
    (base / "sys/module/kvm_intel/parameters/tdx").write_text("N\n")
    plan, _, _ = _setup(root)
    assert [(n.kind, n.text) for n in plan.notices if n.kind == "reboot"] == [
        ("reboot", "kvm_intel reads tdx=on only when it loads")]


def test_a_loaded_gpu_grabbing_driver_is_blacklisted_and_the_reboot_said(debian):
    """nova_core (Ubuntu 25.10/26.04 kernels) takes a Blackwell GPU back after its CC
    reset: blacklisted in tdxvirt's file when the host has NVIDIA GPUs, and since it is
    loaded now, the blacklist counts from the next boot, which setup says."""
    root, base = debian
    _setup(root)
    (base / "proc/modules").write_text("nova_core 40960 0 - Live 0x0\nkvm_intel 1 0 - Live 0x0\n")
    (base / MODPROBE).unlink()
    plan = setup(root, RecordingRunner(), SetupOptions(), lambda step: None, dry_run=True)
    assert not (base / MODPROBE).exists()  # --dry-run writes nothing
    [write] = [s for s in plan.steps if getattr(s, "path", None) == "/" + MODPROBE]
    assert b"blacklist nova_core\n" in write.new and "keep nouveau and nova_core off the GPUs" in write.why
    assert ("warning", "nova_core is loaded now: the blacklist counts from the next boot (or "
            "`modprobe -r` once no GPU uses it)") in [(n.kind, n.text) for n in plan.notices]


FM_CONFIG = "usr/share/nvidia/nvswitch/fabricmanager.cfg"
FM_SETTINGS = ("# Fabric Manager settings\nLOG_LEVEL=4\nFABRIC_MODE=1\n"
               "# PARTITION_RAIL_POLICY=symmetric\nPARTITION_RAIL_POLICY=1\nLOG_FILE_NAME=/var/log/fabricmanager.log\n")


@pytest.fixture
def hgx_b200_host(tmp_path):
    from tdxvirt.host import HostRoot
    from tdxvirt.sim.boards import hgx_b200_devices

    base = debian_host(tmp_path / "hgx", devices=hgx_b200_devices())
    return HostRoot(base), base


def test_fabric_managers_rail_policy_is_set_on_an_hgx_b200_host_and_revert_takes_it_back(hgx_b200_host):
    """Fabric Manager 595+ leaves CC off unless PARTITION_RAIL_POLICY=symmetric: setup
    rewrites the line that counts (the last active one), nothing else, says that Fabric
    Manager must restart, and --revert puts the file back byte for byte."""
    root, base = hgx_b200_host
    (base / FM_CONFIG).parent.mkdir(parents=True)
    (base / FM_CONFIG).write_text(FM_SETTINGS)
    plan = setup(root, RecordingRunner(), SetupOptions(), lambda step: None, dry_run=True)
    assert (base / FM_CONFIG).read_text() == FM_SETTINGS  # a dry run writes nothing
    [write] = [s for s in plan.steps if getattr(s, "path", None) == "/" + FM_CONFIG]
    assert write.new.decode() == FM_SETTINGS.replace("\nPARTITION_RAIL_POLICY=1\n",
                                                     "\nPARTITION_RAIL_POLICY=symmetric\n")
    assert "-PARTITION_RAIL_POLICY=1\n+PARTITION_RAIL_POLICY=symmetric" in render(plan)
    assert any("restart nvidia-fabricmanager" in n.text for n in plan.notices)

    _setup(root)
    assert "PARTITION_RAIL_POLICY=symmetric\nLOG_FILE_NAME" in (base / FM_CONFIG).read_text()
    from tdxvirt.doctor.context import Context
    from tdxvirt.doctor.gpuhost import _fm_rail_policy

    assert _fm_rail_policy(Context(root=root, uri="test:///default")).status == "ok"
    again, _, _ = _setup(root)
    assert not [s for s in again.steps if getattr(s, "path", None) == "/" + FM_CONFIG]
    revert(root, RecordingRunner(), lambda step: None)
    assert (base / FM_CONFIG).read_text() == FM_SETTINGS


def test_a_missing_fabric_manager_is_said_and_a_hopper_host_is_left_alone(hgx_b200_host, debian):
    root, base = hgx_b200_host
    plan = setup(root, RecordingRunner(), SetupOptions(), lambda step: None, dry_run=True)
    assert any(n.kind == "cannot" and "install nvidia-fabricmanager" in n.text for n in plan.notices)
    assert not (base / FM_CONFIG).exists()
    h100_root, _ = debian
    plan = setup(h100_root, RecordingRunner(), SetupOptions(), lambda step: None, dry_run=True)
    assert not [n for n in plan.notices if "abric" in n.text]


def test_the_rail_policy_line_is_added_when_the_file_has_none():
    from tdxvirt.hostcfg.fabricmanager import rail_policy, set_rail_policy

    assert rail_policy("LOG_LEVEL=4") is None
    added = set_rail_policy("LOG_LEVEL=4")
    assert added.startswith("LOG_LEVEL=4\n#") and rail_policy(added) == "symmetric"
    assert rail_policy("# PARTITION_RAIL_POLICY=symmetric\n") is None  # a comment does not count
