"""Doctor checks that read the host: ok and fail cases on fake roots built from real files.

The fake roots start from tdxvirt.sim.hostroot (real H100 sysfs values, Debian's real
TDX firmware descriptor) and add real Debian files: a kernel's .config, the shipped
qemu.conf, /etc/default/grub.
"""

from __future__ import annotations

import functools
import gzip
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from test_hostcfg_realfiles import kernel_config, shipped_qemu_conf
from test_hostcfg_setup import debian_host

from tdxvirt.doctor import cmdline, cpu, gpus, kconfig, ovmf, qemuconf, vfio
from tdxvirt.doctor.check import Check
from tdxvirt.doctor.context import Context
from tdxvirt.host import HostRoot
from tdxvirt.host.commands import RecordingRunner
from tdxvirt.host.kconfig import read_kernel_config
from tdxvirt.host.kmsg import KernelLogUnreadable, read_kernel_log
from tdxvirt.hostcfg.setup import SetupOptions, setup
from tdxvirt.pci import PciAddress
from tdxvirt.sim.hostroot import CPUINFO, FakePciDevice, build_host_root

RELEASE = "6.16.0-tdx-amd64"
# Kernel log records as /dev/kmsg gives them (PRIO,SEQ,USEC,FLAGS;MESSAGE).
TDX_LOG = [
    "6,812,1503211,-;virt/tdx: BIOS enabled: private KeyID range [32, 64)",
    "6,813,1503215,-;virt/tdx: Disable ACPI S3. Turn off TDX in the BIOS to use ACPI S3.",
    "6,1402,9112044,-;virt/tdx: TDX module: attributes 0x0, vendor_id 0x8086, "
    "major_version 1, minor_version 5, build_date 20240129, build_num 698",
    "6,1403,9180120,-;virt/tdx: 1034220 KB allocated for PAMT",
    "6,1404,9180342,-;virt/tdx: module initialized",
]
# What `scripts/config --enable/--disable` makes of a distribution config for a TDX host.
TDX_HOST_EDITS = {"INTEL_TDX_HOST": "y", "IOMMUFD": "y", "IOMMUFD_DRIVER": "y",
                  "VFIO_DEVICE_CDEV": "y", "TDX_GUEST_DRIVER": "m", "KEXEC": None,
                  "CRASH_DUMP": None}


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def statuses(checks: list[Check]) -> dict[str, str]:
    return {c.name: c.status for c in checks}


def ctx_for(root: HostRoot, **kwargs) -> Context:
    return Context(root, runner=RecordingRunner(), **kwargs)


@functools.cache
def tdx_kernel_config_text() -> str:
    """Debian's real kernel config, edited as a TDX host build edits it."""
    text = kernel_config().read_text()
    for symbol, value in TDX_HOST_EDITS.items():
        text = re.sub(rf"^(CONFIG_{symbol}=.*|# CONFIG_{symbol} is not set)\n", "", text,
                      flags=re.MULTILINE)
        text += (f"CONFIG_{symbol}={value}\n" if value else f"# CONFIG_{symbol} is not set\n")
    return text


def write(base: Path, path: str, text: str | bytes = "") -> None:
    target = base / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(text if isinstance(text, bytes) else text.encode())


def tdx_ready_root(base: Path) -> HostRoot:
    """A host on which every local check passes (the doctor's "ok" fixture)."""
    root = build_host_root(base)
    write(base, "/proc/sys/kernel/osrelease", RELEASE + "\n")
    write(base, f"/boot/config-{RELEASE}", tdx_kernel_config_text())
    write(base, "/dev/kmsg", "\n".join(TDX_LOG) + "\n")
    for module in ("vfio", "vfio_pci", "iommufd"):
        (base / "sys/module" / module).mkdir(parents=True, exist_ok=True)
    for node in ("/dev/vfio/vfio", "/dev/vfio/42", "/dev/iommu", "/dev/vfio/devices/vfio0"):
        write(base, node)
    (base / "sys/bus/pci/devices/0000:38:00.0/vfio-dev/vfio0").mkdir(parents=True)
    write(base, "/sys/module/vfio_iommu_type1/parameters/dma_entry_limit", "2097152\n")
    from tdxvirt.enforce.script import HOOK
    from tdxvirt.hostcfg.setup import hook_script

    hook = base / HOOK.lstrip("/")
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_bytes(hook_script())
    hook.chmod(0o755)
    return root


@pytest.fixture
def ready(tmp_path) -> HostRoot:
    return tdx_ready_root(tmp_path / "root")


# --- CPU and firmware ---------------------------------------------------------------

def test_cpu_ok_with_the_module_initialized_in_the_kernel_log(ready):
    checks = by_name(cpu.checks(ctx_for(ready)))
    assert {n: c.status for n, c in checks.items()} == {
        "cpu: TDX flag": "ok", "cpu: TDX module": "ok", "cpu: kvm_intel tdx": "ok"}
    assert checks["cpu: TDX module"].found == (
        "initialized (kernel log); version 1.5 build 698 (20240129)")


def test_cpu_fails_without_bios_tdx_and_with_a_failed_module(tmp_path):
    base = tmp_path / "root"
    root = build_host_root(base, tdx_enabled=False)
    write(base, "/proc/cpuinfo", CPUINFO.replace(" tdx_host_platform", ""))
    write(base, "/dev/kmsg", "3,900,1200000,-;virt/tdx: module initialization failed (-5)\n")
    checks = by_name(cpu.checks(ctx_for(root)))
    assert checks["cpu: TDX flag"].status == "fail"
    assert "enable TDX in the BIOS" in checks["cpu: TDX flag"].remedy
    assert checks["cpu: TDX module"] == Check(
        "cpu: TDX module", "fail", "virt/tdx: module initialization failed (-5)",
        checks["cpu: TDX module"].remedy)
    assert checks["cpu: kvm_intel tdx"].found == "/sys/module/kvm_intel/parameters/tdx = N"


def test_kvm_intel_missing_or_without_tdx_parameter(tmp_path):
    base = tmp_path / "root"
    root = build_host_root(base)
    (base / "sys/module/kvm_intel/parameters/tdx").unlink()
    assert "no tdx parameter" in by_name(cpu.checks(ctx_for(root)))["cpu: kvm_intel tdx"].found
    shutil.rmtree(base / "sys/module/kvm_intel")
    checks = by_name(cpu.checks(ctx_for(root)))
    assert checks["cpu: kvm_intel tdx"].found == "kvm_intel is not loaded"
    assert checks["cpu: TDX module"].status in ("fail", "skip")


def test_this_machines_kernel_log_reads_or_says_it_cannot():
    try:
        messages = read_kernel_log(HostRoot("/"))
    except KernelLogUnreadable:
        return  # no CAP_SYSLOG here: the check then says "not readable"
    assert messages is None or all(isinstance(m, str) for m in messages)


# --- kernel config ------------------------------------------------------------------

def test_a_debian_kernel_config_names_every_missing_symbol(tmp_path):
    base = tmp_path / "root"
    root = build_host_root(base)
    write(base, "/proc/sys/kernel/osrelease", RELEASE + "\n")
    text = kernel_config().read_text()
    write(base, f"/boot/config-{RELEASE}", text)
    checks = by_name(kconfig.checks(ctx_for(root)))
    required = checks["kernel config: required"]
    assert required.status == "fail"
    missing = [s for s in kconfig.REQUIRED if not re.search(rf"^CONFIG_{s}=[ym]$", text, re.M)]
    assert "CONFIG_INTEL_TDX_HOST" in required.found and missing
    assert required.found == (f"/boot/config-{RELEASE}: not set: "
                              + ", ".join(f"CONFIG_{s}" for s in missing))
    assert checks["kernel config: device-passthrough kernel"].status == "warn"
    assert "set: CONFIG_KEXEC, CONFIG_CRASH_DUMP" in checks["kernel config: device-passthrough kernel"].found


def test_a_tdx_host_config_passes_also_from_proc_config_gz(ready, tmp_path):
    assert statuses(kconfig.checks(ctx_for(ready))) == {
        "kernel config: required": "ok", "kernel config: device-passthrough kernel": "ok"}
    (ready.base / f"boot/config-{RELEASE}").unlink()
    write(ready.base, "/proc/config.gz", gzip.compress(tdx_kernel_config_text().encode()))
    checks = kconfig.checks(ctx_for(ready))
    assert checks[0].status == "ok" and checks[0].found.startswith("/proc/config.gz: ")


def test_no_kernel_config_is_skipped(host_root):
    assert statuses(kconfig.checks(ctx_for(host_root))) == {"kernel config": "skip"}


def test_this_machines_own_kernel_config_parses():
    config = read_kernel_config(HostRoot("/"))
    if config is None:
        pytest.skip("this machine has neither /boot/config-$(uname -r) nor /proc/config.gz")
    assert config.enabled("KVM") or config.value("KVM") is None
    assert config.release == os.uname().release


# --- kernel command line ------------------------------------------------------------

def test_cmdline_ok(ready):
    assert set(statuses(cmdline.checks(ctx_for(ready))).values()) == {"ok"}


def test_cmdline_without_anything_fails_and_warns(tmp_path):
    base = tmp_path / "root"
    root = build_host_root(base, devices=())
    write(base, "/proc/cmdline", "BOOT_IMAGE=/vmlinuz-6.1.0-56-amd64 root=/dev/sda1 ro quiet\n")
    assert statuses(cmdline.checks(ctx_for(root))) == {
        "cmdline: intel_iommu=on": "fail", "cmdline: kvm_intel.tdx": "fail",
        "cmdline: nohibernate": "warn", "cmdline: iommu=pt": "warn", "iommu groups": "fail"}


def test_kvm_tdx_from_modprobe_d_and_a_later_file_overriding_it(tmp_path):
    base = tmp_path / "root"
    root = build_host_root(base)
    write(base, "/proc/cmdline", "ro intel_iommu=off\n")
    write(base, "/etc/modprobe.d/tdx.conf", "options kvm_intel tdx=on\n")  # the source doc's
    checks = by_name(cmdline.checks(ctx_for(root)))
    assert checks["cmdline: kvm_intel.tdx"].found == \
        "options kvm_intel tdx=on in /etc/modprobe.d/tdx.conf"
    assert checks["cmdline: intel_iommu=on"].found == "intel_iommu=off"
    write(base, "/etc/modprobe.d/zz-local.conf", "options kvm-intel tdx=0 # off for now\n")
    checks = by_name(cmdline.checks(ctx_for(root)))
    assert checks["cmdline: kvm_intel.tdx"] .status == "fail"
    assert checks["cmdline: kvm_intel.tdx"].found == "tdx=0 in /etc/modprobe.d/zz-local.conf"


def test_iommu_on_by_default_through_the_kernel_config(ready):
    write(ready.base, "/proc/cmdline", "ro kvm_intel.tdx=on nohibernate iommu=pt\n")
    with open(ready.base / f"boot/config-{RELEASE}", "a") as config:
        config.write("CONFIG_INTEL_IOMMU_DEFAULT_ON=y\n")
    check = by_name(cmdline.checks(ctx_for(ready)))["cmdline: intel_iommu=on"]
    assert check.status == "ok" and "CONFIG_INTEL_IOMMU_DEFAULT_ON" in check.found


# --- VFIO ---------------------------------------------------------------------------

def test_vfio_ok(ready):
    checks = by_name(vfio.checks(ctx_for(ready)))
    assert {n: c.status for n, c in checks.items()} == {
        "vfio: modules": "ok", "vfio: /dev/vfio": "ok", "vfio: /dev/iommu": "ok",
        "vfio: device cdevs": "ok", "vfio: dma_entry_limit": "ok"}
    assert checks["vfio: device cdevs"].found == "0000:38:00.0 -> /dev/vfio/devices/vfio0"


def test_vfio_missing_everything(host_root):
    checks = by_name(vfio.checks(ctx_for(host_root)))
    assert {n: c.status for n, c in checks.items()} == {
        "vfio: modules": "fail", "vfio: /dev/vfio": "fail", "vfio: /dev/iommu": "warn",
        "vfio: device cdevs": "fail", "vfio: dma_entry_limit": "skip"}
    assert checks["vfio: device cdevs"].found == "0000:38:00.0 has no vfio-dev cdev"


def test_legacy_vfio_dma_limit_too_low(ready):
    (ready.base / "dev/iommu").unlink()
    write(ready.base, "/sys/module/vfio_iommu_type1/parameters/dma_entry_limit", "65535\n")
    check = by_name(vfio.checks(ctx_for(ready)))["vfio: dma_entry_limit"]
    assert check.status == "warn" and check.found.startswith("0xffff: ")
    assert "--legacy-vfio" in check.remedy


def test_iommufd_missing_fails_when_libvirt_would_use_it(host_root, conn):
    check = by_name(vfio.checks(ctx_for(host_root, connect=lambda: conn)))["vfio: /dev/iommu"]
    assert check.status == "fail" and "libvirt >= 12.1" in check.found


# --- OVMF ---------------------------------------------------------------------------

def test_ovmf_ok_and_missing(tmp_path, host_root):
    assert ovmf.checks(ctx_for(host_root)) == [
        Check("ovmf: TDX firmware", "ok", "/usr/share/ovmf/OVMF.inteltdx.ms.fd")]
    (host_root.base / "usr/share/ovmf/OVMF.inteltdx.ms.fd").unlink()
    assert ovmf.checks(ctx_for(host_root))[0].found == (
        "the descriptor names /usr/share/ovmf/OVMF.inteltdx.ms.fd, which does not exist")
    bare = build_host_root(tmp_path / "bare", tdx_firmware=False)
    check = ovmf.checks(ctx_for(bare))[0]
    assert check.status == "fail" and "ovmf-inteltdx" in check.remedy


# --- qemu.conf ----------------------------------------------------------------------

def _set_daemon_start(base: Path, epoch: float) -> None:
    """Make the fake libvirtd (pid 4242, started 5 s after boot) start at ``epoch``."""
    ticks = os.sysconf("SC_CLK_TCK")
    write(base, "/proc/stat", f"cpu  1 2 3 4\nbtime {int(epoch) - 5}\n")
    assert "500" in (base / "proc/4242/stat").read_text() and ticks == 100


def test_shipped_qemu_conf_fails_what_tds_need(tmp_path):
    base = debian_host(tmp_path / "root")
    checks = by_name(qemuconf.checks(ctx_for(HostRoot(base))))
    assert {n: c.status for n, c in checks.items()} == {
        "qemu.conf: dynamic_ownership": "fail", "qemu.conf: security_driver": "fail",
        "qemu.conf: user/group": "warn", "qemu.conf: read by libvirt": "fail"}
    assert checks["qemu.conf: dynamic_ownership"].found == "unset (1)"
    # The fake daemon started in 2023, before the file was copied: not read yet.
    assert checks["qemu.conf: read by libvirt"].remedy == "`systemctl restart libvirtd`"


def test_after_setup_qemu_conf_passes_once_libvirt_restarted(tmp_path):
    base = debian_host(tmp_path / "root")
    root = HostRoot(base)
    setup(root, RecordingRunner(), SetupOptions(), lambda s: None)
    checks = by_name(qemuconf.checks(ctx_for(root)))
    assert checks["qemu.conf: read by libvirt"].status == "fail"  # changed, not restarted
    _set_daemon_start(base, time.time() + 1)  # the restart setup asked systemd for
    checks = qemuconf.checks(ctx_for(root))
    assert set(statuses(checks).values()) == {"ok"}
    assert by_name(checks)["qemu.conf: user/group"].found == "libvirt-qemu:libvirt-qemu"


def test_security_driver_kept_with_udev_rules_passes(tmp_path):
    base = debian_host(tmp_path / "root")
    root = HostRoot(base)
    setup(root, RecordingRunner(), SetupOptions(security_driver="keep", group="kvm"),
          lambda s: None)
    check = by_name(qemuconf.checks(ctx_for(root)))["qemu.conf: security_driver"]
    assert check.status == "ok" and "gives group kvm the VFIO nodes" in check.found


def test_malformed_or_missing_qemu_conf(tmp_path, host_root):
    assert statuses(qemuconf.checks(ctx_for(host_root))) == {"qemu.conf": "skip"}
    write(host_root.base, "/etc/libvirt/qemu.conf",
          shipped_qemu_conf().read_bytes() + b'security_driver = "none\n')
    check = qemuconf.checks(ctx_for(host_root))[0]
    assert check.status == "fail" and re.fullmatch(
        r"/etc/libvirt/qemu.conf line \d+: unterminated string \(no closing \" on the line\)",
        check.found)


# --- GPUs ---------------------------------------------------------------------------

def test_h100_on_vfio_alone_in_its_group(host_root):
    assert gpus.checks(ctx_for(host_root)) == [
        Check("gpu 0000:38:00.0: driver", "ok", "H100 SXM5 80GB: vfio-pci"),
        Check("gpu 0000:38:00.0: iommu group", "ok", "group 42 alone: viable"),
        Check("gpu 0000:38:00.0: cc mode", "skip", "unknown (NVIDIA's tool not installed, "
              "not root, or not this machine's GPU)", "`pip install 'tdxvirt[gpu]'`, run as root"),
    ]


def test_group_with_a_device_on_a_host_driver_is_not_viable(tmp_path):
    devices = (
        FakePciDevice("0000:38:00.0", driver="nvidia"),
        FakePciDevice("0000:37:00.0", overrides={"vendor": "0x8086", "device": "0x1593",
                                                 "class": "0x020000"}, driver="ice"),
        FakePciDevice("0000:36:00.0", overrides={"vendor": "0x8086", "device": "0x352a",
                                                 "class": "0x060400"}, driver="pcieport"),
    )
    root = build_host_root(tmp_path / "root", devices=devices)
    checks = by_name(gpus.checks(ctx_for(root)))
    assert checks["gpu 0000:38:00.0: driver"].found == "H100 SXM5 80GB: bound to nvidia"
    assert checks["gpu 0000:38:00.0: driver"].status == "warn"
    group = checks["gpu 0000:38:00.0: iommu group"]
    assert (group.status, group.found) == ("fail", "group 42 not viable: 0000:37:00.0 on ice")


def test_for_gpu_that_is_missing_or_not_nvidia(tmp_path):
    nic = FakePciDevice("0000:17:00.0", overrides={"vendor": "0x8086", "class": "0x020000"},
                        driver="ice", iommu_group=7)
    root = build_host_root(tmp_path / "root", devices=(nic,))
    wanted = (PciAddress.parse("17:00.0"), PciAddress.parse("99:00.0"))
    assert [(c.name, c.status) for c in gpus.checks(ctx_for(root, gpus=wanted))] == [
        ("gpu 0000:17:00.0", "fail"), ("gpu 0000:99:00.0", "fail")]
    assert gpus.checks(ctx_for(root)) == [Check(
        "gpus", "warn", "no NVIDIA GPU found",
        "check `lspci -D -d 10de:`; pass --for-gpu BDF to check one")]


def test_gpu_without_iommu_group_fails(tmp_path):
    root = build_host_root(tmp_path / "root",
                           devices=(FakePciDevice("0000:38:00.0", iommu_group=None),))
    check = by_name(gpus.checks(ctx_for(root)))["gpu 0000:38:00.0: iommu group"]
    assert (check.status, check.found) == ("fail", "in no IOMMU group: the IOMMU is off")


@pytest.mark.parametrize("messages, version", [
    ([m.split(";", 1)[1] for m in TDX_LOG], "1.5 build 698 (20240129)"),
    (["virt/tdx: TDX module version 1.5.06 initialized"], "1.5.06"),
    # another subsystem's "version" is not the TDX module's
    (["nvme nvme0: version 1.4", "virt/tdx: module initialized"], None),
    ([], None),
])
def test_the_tdx_module_version_is_read_from_the_kernels_tdx_lines_only(messages, version):
    from tdxvirt.host.kmsg import tdx_module_version

    assert tdx_module_version(messages) == version
