"""Issue #18, items 3 and 9: the overlay and seed define creates.

3. A symlink planted at ``NAME.qcow2`` while root runs ``define --image`` must never
   make root write through it: the overlay is made in a private directory and linked
   into place without replacing anything; a storage directory others can write to (or
   do not own) is refused before anything is made.
9. The overlay and the seed are not world-readable: root:<QEMU's group> from the host's
   qemu.conf, overlay 0660 (QEMU writes it), seed 0640; root:root with a note when the
   group is unknown.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import threading
import uuid

import pytest
from click.testing import CliRunner

from tdxvirt.cli import main
from tdxvirt.config import Config
from tdxvirt.domain.spec import TDSpec
from tdxvirt.errors import InputError
from tdxvirt.lifecycle import tds

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="root-only checks (tdxvirt runs as root)")

QEMU_GID = 4242


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return path


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim"
    path.write_bytes(b"root's precious file\n")
    os.chmod(path, 0o600)
    return path


def _digest(path) -> tuple[str, int, int, int]:
    info = os.stat(path)
    return (hashlib.sha256(path.read_bytes()).hexdigest(), info.st_mode, info.st_uid, info.st_gid)


def _undefine(conn, name):
    try:
        conn.lookupByName(name).undefine()
    except Exception:
        pass


def _with_qemu_conf(host, text: str, group_line: str = f"tdxq:x:{QEMU_GID}:\n"):
    conf = host.path("/etc/libvirt/qemu.conf")
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(text)
    host.path("/etc/group").write_text("root:x:0:\n" + group_line)


def test_a_symlink_planted_while_define_runs_never_redirects_the_overlay(
        conn, gpu_host, base, victim, tmp_path):
    """A bounded loop plants NAME.qcow2 -> victim (and takes it away again) while define
    runs, eight times: the victim never changes; define either refuses with one line or
    makes a regular-file overlay of its own."""
    host, gpu = gpu_host
    images = tmp_path / "images"
    images.mkdir(mode=0o755)
    before = _digest(victim)
    outcomes = []
    for attempt in range(8):
        name = f"t-race-{uuid.uuid4().hex[:8]}"
        target = images / f"{name}.qcow2"
        stop = threading.Event()

        def plant():
            while not stop.is_set():
                try:
                    os.symlink(victim, target)
                except FileExistsError:
                    pass
                if target.is_symlink() and attempt % 2:
                    os.unlink(target)  # flap: gone at the check, back at the write

        planter = threading.Thread(target=plant)
        planter.start()
        try:
            tds.define_td(conn, host, TDSpec.from_user(name=name, gpus=[gpu], image=str(base),
                                                       image_format="qcow2"),
                          Config(overlay_dir=str(images)))
            outcomes.append("defined")
        except InputError as error:
            assert "already exists" in str(error) and "\n" not in str(error)
            outcomes.append("refused")
        finally:
            stop.set()
            planter.join()
            _undefine(conn, name)
        assert _digest(victim) == before, "root wrote through the planted symlink"
        if outcomes[-1] == "defined":
            assert stat.S_ISREG(os.lstat(target).st_mode)
            info = subprocess.run(["qemu-img", "info", "--output=json", str(target)],
                                  capture_output=True, text=True, check=True).stdout
            assert str(base) in info
        # nothing of tdxvirt's private directories is left behind
        assert not [p for p in images.iterdir() if p.name.startswith(".tdxvirt-")]
    assert _digest(victim) == before


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o1777])
def test_a_storage_directory_others_can_write_is_refused_before_anything(
        sim_uri, gpu_host, base, victim, tmp_path, monkeypatch, td_name, conn, mode):
    host, gpu = gpu_host
    images = tmp_path / "images"
    images.mkdir()
    os.chmod(images, mode)
    config = tmp_path / "config.toml"
    config.write_text(f'[defaults]\noverlay_dir = "{images}"\n')
    monkeypatch.setenv("TDXVIRT_CONFIG", str(config))
    before = _digest(victim)
    result = CliRunner().invoke(main, ["-c", sim_uri, "--host-root", str(host.base), "define",
                                       td_name, "--gpu", gpu, "--image", str(base),
                                       "--image-format", "qcow2"])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert "writable by group or others" in result.output and str(images) in result.output
    assert list(images.iterdir()) == []
    assert td_name not in [d.name() for d in conn.listAllDomains(0)]
    assert _digest(victim) == before


def test_a_storage_directory_not_owned_by_root_is_refused(conn, gpu_host, base, tmp_path, td_name):
    host, gpu = gpu_host
    images = tmp_path / "images"
    images.mkdir(mode=0o755)
    os.chown(images, 65534, 65534)
    with pytest.raises(InputError, match="owned by uid 65534, not root") as error:
        tds.define_td(conn, host, TDSpec.from_user(name=td_name, gpus=[gpu], image=str(base)),
                      Config(overlay_dir=str(images)))
    assert "\n" not in str(error.value)
    assert list(images.iterdir()) == []


def test_a_directory_above_it_others_can_write_is_refused(conn, gpu_host, base, tmp_path, td_name):
    host, gpu = gpu_host
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # not sticky: anyone could rename images/ away and replace it
    images = shared / "images"
    images.mkdir(mode=0o755)
    with pytest.raises(InputError, match=f"{shared}, a directory above") as error:
        tds.define_td(conn, host, TDSpec.from_user(name=td_name, gpus=[gpu], image=str(base)),
                      Config(overlay_dir=str(images)))
    assert "\n" not in str(error.value)
    assert list(images.iterdir()) == []


def test_overlay_and_seed_belong_to_root_and_qemus_group(conn, gpu_host, base, tmp_path, td_name):
    host, gpu = gpu_host
    _with_qemu_conf(host, '#group = "libvirt-qemu"\ngroup = "tdxq"\ndynamic_ownership = 0\n')
    images = tmp_path / "images"
    user_data = tmp_path / "user-data"
    user_data.write_text("#cloud-config\npassword: secret\n")
    td = tds.define_td(conn, host, TDSpec.from_user(name=td_name, gpus=[gpu], image=str(base),
                                                    user_data=str(user_data)),
                       Config(overlay_dir=str(images)))
    overlay, seed = os.stat(images / f"{td_name}.qcow2"), os.stat(images / f"{td_name}-seed.iso")
    assert (stat.S_IMODE(overlay.st_mode), overlay.st_uid, overlay.st_gid) == (0o660, 0, QEMU_GID)
    assert (stat.S_IMODE(seed.st_mode), seed.st_uid, seed.st_gid) == (0o640, 0, QEMU_GID)
    assert not any("QEMU's group" in w for w in td.plan.warnings)
    assert sorted(p.name for p in images.iterdir()) == [f"{td_name}-seed.iso", f"{td_name}.qcow2"]


def test_the_commented_default_group_is_libvirts_own(conn, gpu_host, tmp_path, td_name):
    """qemu.conf's '#group = ...' line is what libvirt's build uses when none is set."""
    host, gpu = gpu_host
    _with_qemu_conf(host, '#user = "libvirt-qemu"\n#group = "libvirt-qemu"\n',
                    f"libvirt-qemu:x:{QEMU_GID}:\n")
    images = tmp_path / "images"
    tds.define_td(conn, host, TDSpec.from_user(name=td_name, gpus=[gpu], cloud_init=True),
                  Config(overlay_dir=str(images)))
    seed = os.stat(images / f"{td_name}-seed.iso")
    assert (stat.S_IMODE(seed.st_mode), seed.st_gid) == (0o640, QEMU_GID)


def test_unknown_group_falls_back_to_root_with_one_note(sim_uri, gpu_host, tmp_path, td_name,
                                                         monkeypatch):
    host, gpu = gpu_host  # a fake host root without qemu.conf
    images = tmp_path / "images"
    config = tmp_path / "config.toml"
    config.write_text(f'[defaults]\noverlay_dir = "{images}"\n')
    monkeypatch.setenv("TDXVIRT_CONFIG", str(config))
    result = CliRunner().invoke(main, ["-c", sim_uri, "--host-root", str(host.base), "define",
                                       td_name, "--gpu", gpu, "--cloud-init"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "QEMU's group is unknown" in line]
    assert len(notes) == 1 and notes[0].startswith("tdxvirt: warning: ")
    seed = os.stat(images / f"{td_name}-seed.iso")
    assert (stat.S_IMODE(seed.st_mode), seed.st_uid, seed.st_gid) == (0o640, 0, 0)


def test_the_simulated_hosts_qemu_group_is_found(sim):
    """The forky root's real qemu.conf names no group; its commented default does."""
    from tdxvirt.lifecycle.assemble import storage_owner

    owner = storage_owner(sim.host())
    assert owner.group == "libvirt-qemu" and owner.gid > 0 and owner.note is None


def test_without_hard_links_the_move_is_renameat2_noreplace(tmp_path, monkeypatch, victim):
    """File systems without hard links: renameat2(RENAME_NOREPLACE), which refuses an
    existing name, a dangling symlink included."""
    import errno

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    source = tmp_path / "made"
    source.write_bytes(b"new")
    tds._place(str(source), str(tmp_path / "placed"))
    assert (tmp_path / "placed").read_bytes() == b"new" and not source.exists()
    source.write_bytes(b"new")
    planted = tmp_path / "planted"
    os.symlink(tmp_path / "nowhere", planted)
    with pytest.raises(InputError, match="already exists"):
        tds._place(str(source), str(planted))
    assert os.path.islink(planted) and not (tmp_path / "nowhere").exists()
