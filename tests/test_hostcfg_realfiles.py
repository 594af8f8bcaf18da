"""Real files shipped by Debian packages, fetched once, and libvirt's own qemu.conf grammar.

Other host tests import the helpers here. Packages are fetched with ``apt-get
download`` and unpacked with ``dpkg-deb -x`` into ``<state dir>/fixtures/debs/``
(cached: later runs read the unpacked tree). libvirt's augeas lens is run through
augtool (package augeas-tools).
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tdxvirt.hostcfg.qemuconf import QemuConf
from tdxvirt.paths import state_dir
from tdxvirt.sim import layout

FORKY = layout().chroot
FORKY_QEMU_CONF = FORKY / "etc/libvirt/qemu.conf"
FORKY_LENSES = FORKY / "usr/share/augeas/lenses"
LIBVIRT_FILES = ("etc/libvirt/qemu.conf", "usr/share/augeas/lenses/*.aug")


def _apt_get_download(package: str, into: Path) -> Path:
    for attempt in range(2):
        done = subprocess.run(["apt-get", "download", "-q", package], cwd=into,
                              capture_output=True, text=True)
        debs = list(into.glob("*.deb"))
        if done.returncode == 0 and debs:
            return debs[0]
        if attempt == 0:  # package lists missing or stale on a fresh machine
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
    pytest.fail(f"apt-get download {package} failed: {done.stderr.strip()[-300:]}")


@functools.cache
def debian_package(package: str, keep: tuple[str, ...]) -> Path:
    """The files of a Debian package matching the globs ``keep`` (fetched once, cached).

    Only what the tests read is cached: a kernel's headers are 30 MB, its .config 260 KB.
    """
    cache = state_dir() / "fixtures" / "debs" / package
    if (cache / ".complete").exists():
        return cache
    with tempfile.TemporaryDirectory() as temp:
        deb = _apt_get_download(package, Path(temp))
        unpacked = Path(temp) / "root"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        if cache.exists():
            shutil.rmtree(cache)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.mkdir()
        for pattern in keep:
            for source in unpacked.glob(pattern):
                target = cache / source.relative_to(unpacked)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
        (cache / ".deb").write_text(deb.name + "\n")
    (cache / ".complete").write_text("ok\n")
    return cache


def shipped_qemu_conf() -> Path:
    """/etc/libvirt/qemu.conf as Debian ships it (this release's package)."""
    # libvirt-daemon-driver-qemu ships it from Debian 13 on; Debian 12 (libvirt 9.0)
    # ships it in libvirt-daemon-system.
    for package in ("libvirt-daemon-driver-qemu", "libvirt-daemon-system"):
        path = debian_package(package, LIBVIRT_FILES) / "etc/libvirt/qemu.conf"
        if path.exists():
            return path
    pytest.fail("no Debian package of this release ships /etc/libvirt/qemu.conf")


def shipped_lenses() -> Path:
    return debian_package("libvirt-daemon-driver-qemu", LIBVIRT_FILES) / "usr/share/augeas/lenses"


@functools.cache
def kernel_config() -> Path:
    """A real Debian kernel's .config (from linux-headers-<version>-amd64)."""
    depends = subprocess.run(["apt-cache", "depends", "linux-headers-amd64"],
                             capture_output=True, text=True).stdout
    names = [line.split(":", 1)[1].strip() for line in depends.splitlines()
             if line.strip().startswith("Depends:") and "linux-headers-" in line]
    if not names:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        depends = subprocess.run(["apt-cache", "depends", "linux-headers-amd64"],
                                 capture_output=True, text=True).stdout
        names = [line.split(":", 1)[1].strip() for line in depends.splitlines()
                 if line.strip().startswith("Depends:") and "linux-headers-" in line]
    assert names, "apt-cache knows no linux-headers-amd64"
    tree = debian_package(names[0], ("usr/src/linux-headers-*/.config",))
    configs = list((tree / "usr/src").glob("linux-headers-*/.config"))
    assert configs, f"{names[0]} has no .config"
    return configs[0]


def grub_defaults() -> Path:
    """The /etc/default/grub Debian installs (grub2-common's template)."""
    return debian_package("grub2-common", ("usr/share/grub/default/grub",)) / \
        "usr/share/grub/default/grub"


def augeas_load(conf_text: bytes, lenses: Path, tmp: Path) -> dict[str, str]:
    """Load qemu.conf with libvirt's lens through augtool: its tree of settings.

    Keys are augeas paths below the file (``user``, ``cgroup_device_acl/1``); a node
    without a value (an empty list) maps to None.
    """
    if shutil.which("augtool") is None:
        pytest.fail("augtool missing: apt-get install augeas-tools augeas-lenses")
    root = tmp / "augroot"
    (root / "etc/libvirt").mkdir(parents=True, exist_ok=True)
    (root / "etc/libvirt/qemu.conf").write_bytes(conf_text)
    script = "\n".join([
        "set /augeas/load/Libvirtd_qemu/lens Libvirtd_qemu.lns",
        "set /augeas/load/Libvirtd_qemu/incl /etc/libvirt/qemu.conf",
        "load",
        "print /augeas//error",
        "print /files/etc/libvirt/qemu.conf/*[label() != '#comment' and label() != '#empty']",
    ]) + "\n"
    done = subprocess.run(["augtool", "-r", str(root), "-I", str(lenses), "--noautoload"],
                          input=script, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    if "/augeas/files/etc/libvirt/qemu.conf/error" in done.stdout:
        raise AssertionError(f"libvirt's lens rejects the file:\n{done.stdout}")
    settings = {}
    for line in done.stdout.splitlines():
        prefix = "/files/etc/libvirt/qemu.conf/"
        if line.startswith(prefix):
            path, _, value = line[len(prefix):].partition(" = ")
            settings[path] = value.strip('"') if value else None
    return settings


LENS_SETS = {
    "debian-release": lambda: shipped_lenses(),
    "forky-12.8": lambda: FORKY_LENSES,
}


@pytest.fixture(params=sorted(LENS_SETS))
def lenses(request) -> Path:
    path = LENS_SETS[request.param]()
    assert (path / "libvirtd_qemu.aug").exists(), path
    return path


def test_shipped_qemu_conf_has_no_active_setting_and_the_lens_accepts_it(lenses, tmp_path):
    data = shipped_qemu_conf().read_bytes()
    assert QemuConf.parse(data).entries == ()
    assert augeas_load(data, lenses, tmp_path) == {}


def test_forky_qemu_conf_is_libvirt_12_with_the_simulator_line(tmp_path):
    data = FORKY_QEMU_CONF.read_bytes()
    conf = QemuConf.parse(data)
    assert [(e.key, e.value) for e in conf.entries] == [("namespaces", [])]
    assert augeas_load(data, FORKY_LENSES, tmp_path) == {"namespaces": None}


def test_the_lens_check_catches_what_libvirt_rejects(lenses, tmp_path):
    with pytest.raises(AssertionError, match="rejects"):
        augeas_load(b'user = "root\n', lenses, tmp_path)


def test_kernel_config_and_grub_template_are_real_files():
    assert "CONFIG_KVM_INTEL=m" in kernel_config().read_text()
    assert 'GRUB_CMDLINE_LINUX=""' in grub_defaults().read_text()
