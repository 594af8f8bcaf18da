"""undefine --remove-storage deletes only the files tdxvirt made (issue #14).

The domain XML is editable by anyone with libvirt access; these tests edit it through
libvirt's own API (setMetadata, defineXML) on the TDX-aware test driver, as such a
user would, and check that a root-run tdxvirt then deletes nothing it should not.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from click.testing import CliRunner
from lxml import etree

from tdxvirt.cli import main
from tdxvirt.config import Config
from tdxvirt.domain.domainxml import NAMESPACE, read_domain_xml
from tdxvirt.domain.spec import TDSpec
from tdxvirt.errors import InputError
from tdxvirt.lifecycle import tds
from tdxvirt.virt.conn import open_connection

METADATA_ELEMENT = 2  # VIR_DOMAIN_METADATA_ELEMENT
T = f"{{{NAMESPACE}}}"


@pytest.fixture
def td(conn, gpu_host, td_name, tmp_path):
    """A TD with an overlay and a cloud-init seed in tmp_path/img, and the Config that
    put them there. Returns (config, overlay path, seed path)."""
    host, gpu = gpu_host
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "32M"], check=True)
    config = Config(overlay_dir=str(tmp_path / "img"))
    tds.define_td(conn, host, TDSpec.from_user(name=td_name, gpus=[gpu], image=str(base),
                                               cloud_init=True), config)
    overlay, seed = tmp_path / "img" / f"{td_name}.qcow2", tmp_path / "img" / f"{td_name}-seed.iso"
    assert overlay.is_file() and seed.is_file()
    return config, overlay, seed


@pytest.fixture
def victim(tmp_path):
    """A file no undefine may ever delete (stands in for /etc/shadow)."""
    path = tmp_path / "etc" / "shadow"
    path.parent.mkdir()
    path.write_text("root:*:1::::::\n")
    return path


def set_recorded(conn, name, **paths):
    """Rewrite tdxvirt's metadata (overlay=..., seed=...) the way `virsh metadata --set` does,
    on a domain root holds no record of (as an older tdxvirt defined it): only then are
    the metadata's paths read at all, and these rules judge them (with a record, see
    test_the_record_decides_and_metadata_edits_change_nothing)."""
    from tdxvirt.domain.record import local_store

    domain = conn.lookupByName(name)
    local_store().remove(domain.UUIDString())
    mark = etree.fromstring(domain.metadata(METADATA_ELEMENT, NAMESPACE).encode())
    for element in mark.iter():  # libvirt hands the element back without its namespace
        element.tag = T + etree.QName(element).localname
    for kind, path in paths.items():
        element = mark.find(T + kind)
        if element is None:
            element = etree.SubElement(mark, T + kind)
        element.text = str(path)
    domain.setMetadata(METADATA_ELEMENT, etree.tostring(mark).decode(), "tdxvirt", NAMESPACE, 0)
    facts = read_domain_xml(domain.XMLDesc(0))
    assert all(getattr(facts, kind) == str(path) for kind, path in paths.items())


def set_disk_source(conn, name, old, new):
    """Redefine the domain with the disk whose source is ``old`` now using ``new``."""
    root = etree.fromstring(conn.lookupByName(name).XMLDesc(0).encode())
    source = next(s for s in root.iterfind("devices/disk/source") if s.get("file") == str(old))
    source.set("file", str(new))
    conn.defineXML(etree.tostring(root).decode())


def assert_refused(conn, name, config, refused, *untouched):
    with pytest.raises(InputError) as error:
        tds.undefine(conn, name, remove_storage=True, config=config)
    message = str(error.value)
    assert message.startswith(f"refusing to delete {refused}: ") and "\n" not in message
    assert "nothing was deleted" in message and f"rm -- {refused}" in message
    assert conn.lookupByName(name)  # still defined: the user can retry
    for path in untouched:
        assert os.path.lexists(path), path
    return message


def test_the_ordinary_case_removes_exactly_the_overlay_and_the_seed(conn, td, td_name, tmp_path):
    config, overlay, seed = td
    assert tds.undefine(conn, td_name, remove_storage=True, config=config) == [str(overlay),
                                                                                str(seed)]
    assert not overlay.exists() and not seed.exists() and (tmp_path / "base.qcow2").exists()
    assert td_name not in [d.name() for d in conn.listAllDomains(0)]


@pytest.mark.parametrize("kind", ["overlay", "seed"])
def test_metadata_naming_another_file_is_refused(conn, td, td_name, victim, kind):
    config, overlay, seed = td
    set_recorded(conn, td_name, **{kind: victim})
    message = assert_refused(conn, td_name, config, victim, victim, overlay, seed)
    assert "storage directory" in message


def test_the_record_decides_and_metadata_edits_change_nothing(conn, td, td_name, victim):
    """A libvirt user points the metadata at a victim: root's record names the overlay
    and seed define created, so those go and the victim stays."""
    from tdxvirt.domain.record import local_store

    config, overlay, seed = td
    domain = conn.lookupByName(td_name)
    mark = etree.fromstring(domain.metadata(METADATA_ELEMENT, NAMESPACE).encode())
    for element in mark.iter():
        element.tag = T + etree.QName(element).localname
    mark.find(T + "overlay").text = str(victim)
    domain.setMetadata(METADATA_ELEMENT, etree.tostring(mark).decode(), "tdxvirt", NAMESPACE, 0)
    assert local_store().read(domain.UUIDString()).overlay == str(overlay)
    assert tds.undefine(conn, td_name, remove_storage=True, config=config) == [str(overlay),
                                                                                str(seed)]
    assert victim.read_text() == "root:*:1::::::\n"
    assert local_store().read(domain.UUIDString()) is None


def test_a_victim_that_is_also_a_disk_is_still_refused(conn, td, td_name, victim):
    """Editing the disk source too (rule 3 holds) does not help: wrong directory and name."""
    config, overlay, seed = td
    set_disk_source(conn, td_name, overlay, victim)
    set_recorded(conn, td_name, overlay=victim)
    assert_refused(conn, td_name, config, victim, victim, overlay, seed)


def test_a_file_of_the_right_name_in_another_directory_is_refused(conn, td, td_name, tmp_path):
    config, overlay, seed = td
    other = tmp_path / "someone-else" / overlay.name
    other.parent.mkdir()
    other.write_bytes(b"another VM's disk")
    set_disk_source(conn, td_name, overlay, other)
    set_recorded(conn, td_name, overlay=other)
    assert_refused(conn, td_name, config, other, other, overlay, seed)


@pytest.mark.parametrize("path", ["{img}/../etc/shadow", "{img}/../img/{name}.qcow2",
                                  "img/{name}.qcow2", "{img}//{name}.qcow2"])
def test_relative_or_unnormalised_paths_are_refused(conn, td, td_name, victim, path):
    config, overlay, seed = td
    recorded = path.format(img=overlay.parent, name=td_name)
    set_recorded(conn, td_name, overlay=recorded)
    assert_refused(conn, td_name, config, recorded, victim, overlay, seed)


def test_a_path_only_in_metadata_is_refused(conn, td, td_name, tmp_path):
    """The right file in the right place, but no disk of the domain uses it any more."""
    config, overlay, seed = td
    moved = tmp_path / "elsewhere.qcow2"
    set_disk_source(conn, td_name, overlay, moved)
    message = assert_refused(conn, td_name, config, overlay, overlay, seed)
    assert "not a disk of" in message


def test_a_file_put_at_the_overlays_name_later_is_refused(conn, td, td_name):
    """Right name, right place, still the disk: but not the file define created (another
    inode), so no proof tdxvirt made it."""
    config, overlay, seed = td
    data = overlay.read_bytes()
    overlay.unlink()
    overlay.write_bytes(data)  # someone's own file now, at tdxvirt's name
    message = assert_refused(conn, td_name, config, overlay, overlay, seed)
    assert "no record of creating this file" in message


def test_metadata_and_disks_alone_never_name_a_file(conn, td, td_name, tmp_path):
    """A domain whose XML says everything tdxvirt would (metadata, disk source, the
    storage directory's name pattern) about a file tdxvirt did not create."""
    config, overlay, seed = td
    foreign = overlay.parent / f"{td_name}-seed.iso"
    seed.unlink()
    foreign.write_bytes(b"a file another tool made")
    message = assert_refused(conn, td_name, config, foreign, foreign, overlay)
    assert "no record of creating this file" in message


def test_a_symlink_as_the_overlay_is_refused(conn, td, td_name, victim):
    config, overlay, seed = td
    overlay.unlink()
    overlay.symlink_to(victim)
    message = assert_refused(conn, td_name, config, overlay, victim, overlay, seed)
    assert "is a symlink" in message and victim.read_text().startswith("root:")


def test_a_symlinked_parent_directory_is_refused(conn, td, td_name, tmp_path, victim):
    """The storage directory swapped for a symlink to a directory holding a victim of
    the expected name: the path string still matches, the walk does not."""
    config, overlay, seed = td
    (victim.parent / overlay.name).write_bytes(b"not tdxvirt's")
    overlay.parent.rename(tmp_path / "img.real")
    overlay.parent.symlink_to(victim.parent)
    message = assert_refused(conn, td_name, config, overlay, victim.parent / overlay.name,
                             tmp_path / "img.real" / overlay.name)
    assert "symlink" in message


def test_a_symlink_higher_up_is_refused(conn, gpu_host, td_name, tmp_path):
    """Even when the configured directory itself is reached through a symlink."""
    host, gpu = gpu_host
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    config = Config(overlay_dir=str(tmp_path / "link" / "img"))
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "32M"], check=True)
    tds.define_td(conn, host, TDSpec.from_user(name=td_name, gpus=[gpu], image=str(base)), config)
    overlay = tmp_path / "link" / "img" / f"{td_name}.qcow2"
    assert_refused(conn, td_name, config, overlay, tmp_path / "real" / "img" / overlay.name)


def test_a_fifo_is_not_a_regular_file(conn, td, td_name):
    config, overlay, seed = td
    overlay.unlink()
    os.mkfifo(overlay)
    assert "not a regular file" in assert_refused(conn, td_name, config, overlay, overlay, seed)


def test_all_or_nothing_a_good_overlay_stays_when_the_seed_is_refused(conn, td, td_name, victim):
    config, overlay, seed = td
    set_recorded(conn, td_name, seed=victim)
    assert_refused(conn, td_name, config, victim, overlay, seed, victim)
    assert overlay.stat().st_size > 0


def test_an_already_deleted_file_is_skipped(conn, td, td_name):
    config, overlay, seed = td
    seed.unlink()
    assert tds.undefine(conn, td_name, remove_storage=True, config=config) == [str(overlay)]


def test_without_remove_storage_the_metadata_is_not_even_checked(conn, td, td_name, victim):
    config, overlay, seed = td
    set_recorded(conn, td_name, overlay=victim)
    assert tds.undefine(conn, td_name, config=config) == []
    assert victim.exists() and overlay.exists() and seed.exists()


@pytest.fixture
def config_file(td, tmp_path, monkeypatch):
    """The CLI reads the storage directory from the config file, as in production."""
    config, _, _ = td
    path = tmp_path / "config.toml"
    path.write_text(f'[defaults]\noverlay_dir = "{config.overlay_dir}"\n')
    monkeypatch.setenv("TDXVIRT_CONFIG", str(path))
    return path


def test_cli_refusal_is_one_line_and_changes_nothing(conn, sim_uri, td, td_name, victim,
                                                     config_file):
    _, overlay, seed = td
    set_recorded(conn, td_name, overlay=victim)
    result = CliRunner().invoke(main, ["-c", sim_uri, "undefine", td_name, "--remove-storage"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert len(result.output.splitlines()) == 1 and "Traceback" not in result.output
    assert result.output.startswith(f"tdxvirt: error: refusing to delete {victim}: ")
    assert victim.exists() and overlay.exists() and seed.exists()
    assert conn.lookupByName(td_name)


def test_cli_ordinary_case(conn, sim_uri, td, td_name, config_file):
    _, overlay, seed = td
    result = CliRunner().invoke(main, ["-c", sim_uri, "undefine", td_name, "--remove-storage"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"Undefined '{td_name}' (UUID ")  # the domain acted on, as resolved
    assert lines[1:] == [f"  removed {overlay}", f"  removed {seed}"]
    assert not overlay.exists() and not seed.exists()


needs_sshd = pytest.mark.skipif(not os.path.exists("/usr/sbin/sshd") or not shutil.which("nc"),
                                reason="openssh-server and netcat-openbsd (scripts/setup installs them)")
if os.path.exists("/usr/sbin/sshd"):
    from test_remote import ssh_uri  # noqa: F401  (the module-scoped sshd fixture)


@needs_sshd
def test_remote_uri_deletes_nothing_here(ssh_uri, conn, td, td_name):  # noqa: F811
    """The same daemon reached over ssh: the paths name files on that host."""
    config, overlay, seed = td
    remote = open_connection(ssh_uri)
    try:
        message = assert_refused(remote, td_name, config, overlay, overlay, seed)
    finally:
        remote.close()
    assert "remote host" in message and "removed on that host" in message


def test_a_full_record_directory_leaves_no_half_written_record(tmp_path, monkeypatch):
    """ENOSPC while recording a created file: one line, and no empty temporary record
    left in root's records (a full created/ left one before)."""
    from tdxvirt.domain import storage_paths
    from tdxvirt.errors import TdxvirtError

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    monkeypatch.setenv("TDXVIRT_STATE_DIR", str(state))
    (state / "created").mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k,mode=0700", "tmpfs", str(state / "created")],
                   check=True)
    try:
        (state / "created" / "filler").write_bytes(b"\0" * 4096)  # the file system is now full
        made = tmp_path / "overlay.qcow2"
        made.write_bytes(b"x")
        with pytest.raises(TdxvirtError, match="No space left on device"):
            storage_paths.record_created(str(made))
        assert sorted(os.listdir(state / "created")) == ["filler"]
    finally:
        subprocess.run(["umount", str(state / "created")], check=True)
