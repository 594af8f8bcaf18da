"""The first-boot seed: user-data from domains/user-data.j2, and the NoCloud ISO read back.

Read back with pycdlib, the system's isoinfo (genisoimage) and blkid (what cloud-init
uses to find the ``cidata`` volume); the user-data is checked by cloud-init's own schema
validator; the keys are real ones made by ssh-keygen.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tdxvirt.errors import InputError, NotFoundError
from tdxvirt.guest.seed import build_seed_iso, plan_seed, read_seed_iso, write_seed_iso
from tdxvirt.guest.userdata import (
    check_hostname,
    hostname_for,
    parse_ssh_public_keys,
    read_ssh_key_file,
    read_user_data_file,
    render_user_data,
    yaml_quote,
)


@pytest.fixture(scope="module")
def ssh_keys(tmp_path_factory) -> dict[str, str]:
    """Real public keys of three types, made by ssh-keygen."""
    directory = tmp_path_factory.mktemp("keys")
    keys = {}
    for kind, extra in (("ed25519", []), ("ecdsa", ["-b", "384"]), ("rsa", ["-b", "2048"])):
        private = directory / f"id_{kind}"
        subprocess.run(["ssh-keygen", "-q", "-t", kind, *extra, "-N", "", "-C", f"me@{kind}",
                        "-f", str(private)], check=True)
        keys[kind] = str(private)
    return keys


def _pub(path: str) -> str:
    with open(path + ".pub") as handle:
        return handle.read().strip()


def _files_by_path(document: dict) -> dict[str, str]:
    return {entry["path"]: entry["content"] for entry in document["write_files"]}


# --- the shipped template -------------------------------------------------------------------

def test_default_user_data_prepares_the_guest_for_cc(ssh_keys):
    keys = [_pub(ssh_keys["ed25519"]), _pub(ssh_keys["rsa"])]
    text = render_user_data(hostname="td-38-00-0", user="alice", ssh_keys=keys)
    assert text.startswith("#cloud-config\n")
    document = yaml.safe_load(text)
    assert document["hostname"] == "td-38-00-0"
    [user] = document["users"]
    assert (user["name"], user["ssh_authorized_keys"], user["lock_passwd"]) == ("alice", keys, True)
    assert "qemu-guest-agent" in document["packages"]
    files = _files_by_path(document)
    modules = files["/etc/modules-load.d/tdxvirt-spdm-crypto.conf"].split()
    assert "ecdsa_generic" in modules and "ecdh_generic" in modules
    assert "softdep nvidia pre: ecdsa_generic ecdh_generic" in files["/etc/modprobe.d/tdxvirt-nvidia-spdm.conf"]
    persistenced = files["/etc/systemd/system/nvidia-persistenced.service.d/tdxvirt-uvm-persistence.conf"]
    assert "ExecStart=/usr/bin/nvidia-persistenced --uvm-persistence-mode" in persistenced
    unit = files["/etc/systemd/system/tdxvirt-nvidia-cc-ready.service"]
    assert "ExecStart=/usr/bin/nvidia-smi conf-compute -srs 1" in unit
    assert ["systemctl", "enable", "tdxvirt-nvidia-cc-ready.service"] in document["runcmd"]
    assert ["update-grub"] in document["runcmd"]
    assert document["power_state"]["mode"] == "reboot"


def test_grub_drop_in_appends_clearcpuid_when_sourced(tmp_path):
    """update-grub sources /etc/default/grub, then grub.d/*.cfg: run the real shell on it."""
    document = yaml.safe_load(render_user_data(hostname="td", ssh_keys=()))
    drop_in = tmp_path / "99-tdxvirt-tdx.cfg"
    drop_in.write_text(_files_by_path(document)["/etc/default/grub.d/99-tdxvirt-tdx.cfg"])
    result = subprocess.run(
        ["sh", "-c", 'GRUB_CMDLINE_LINUX_DEFAULT="quiet splash"; . "$1"; printf %s "$GRUB_CMDLINE_LINUX_DEFAULT"',
         "sh", str(drop_in)], capture_output=True, text=True, check=True)
    assert result.stdout == "quiet splash clearcpuid=mtrr"


def test_no_keys_renders_no_key_list_which_cloud_init_accepts(tmp_path):
    """An empty ssh_authorized_keys list is one cloud-init's schema refuses ("not valid
    under any of the given schemas"): without keys the entry is left out."""
    text = render_user_data(hostname="td", user="tdx", ssh_keys=())
    assert "ssh_authorized_keys" not in yaml.safe_load(text)["users"][0]
    rendered = tmp_path / "user-data"
    rendered.write_text(text)
    result = subprocess.run(["cloud-init", "schema", "--config-file", str(rendered)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cloud_init_accepts_the_rendered_user_data(ssh_keys, tmp_path):
    if shutil.which("cloud-init") is None:
        pytest.skip("cloud-init is not installed (scripts/setup installs the Debian package)")
    rendered = tmp_path / "user-data"
    rendered.write_text(render_user_data(hostname="td-1", user="tdx", ssh_keys=[_pub(ssh_keys["ecdsa"])]))
    result = subprocess.run(["cloud-init", "schema", "--config-file", str(rendered)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout


def test_hostile_key_comment_stays_one_quoted_string(ssh_keys):
    base = _pub(ssh_keys["ed25519"]).rsplit(" ", 1)[0]
    one_line = base + ' x" ]: #\t{runcmd: [[rm, -rf, /]]} \'caf\u00e9\' \U0001f600 \\'
    for line_break in ("\n", "\r", "\u2028", "\x85"):  # two lines: refused outright
        with pytest.raises(InputError):
            render_user_data(hostname="td", ssh_keys=[one_line + line_break + "runcmd: [[reboot]]"])
    document = yaml.safe_load(render_user_data(hostname="td", ssh_keys=[one_line]))
    assert document["users"][0]["ssh_authorized_keys"] == [one_line]
    assert "runcmd" in document and document["runcmd"][0] == ["update-grub"]  # the template's own


@settings(max_examples=300)
@given(st.text())
def test_yaml_quote_reads_back_as_the_same_string(value):
    assert yaml.safe_load(yaml_quote(value)) == value
    assert yaml.safe_load(f"key: {yaml_quote(value)}\nafter: 1\n") == {"key": value, "after": 1}


def test_yaml_quote_refuses_non_strings():
    with pytest.raises(TypeError):
        yaml_quote(3)


@given(st.text(min_size=1, max_size=80))
def test_any_domain_name_gives_a_valid_hostname(name):
    assert check_hostname(hostname_for(name)) == hostname_for(name)


@pytest.mark.parametrize("user", ["root", "Alice", "1abc", "a b", "", "x" * 33, "a\nb", 'a"b'])
def test_bad_user_names_are_refused(user):
    with pytest.raises(InputError, match="user name"):
        render_user_data(hostname="td", user=user)


@pytest.mark.parametrize("hostname", ["", "-td", "td-", "TD", "t_d", "a" * 64, "a..b", "td\n"])
def test_bad_hostnames_are_refused(hostname):
    with pytest.raises(InputError, match="host name"):
        render_user_data(hostname=hostname)


# --- ssh keys -------------------------------------------------------------------------------

def test_real_public_keys_of_each_type_are_read(ssh_keys):
    for kind, private in ssh_keys.items():
        assert read_ssh_key_file(private + ".pub") == [_pub(private)], kind


def test_authorized_keys_with_options_and_comments(ssh_keys, tmp_path):
    lines = ["# team keys", "", f'from="10.0.0.0/8" {_pub(ssh_keys["ed25519"])}', _pub(ssh_keys["rsa"])]
    path = tmp_path / "authorized_keys"
    path.write_text("\n".join(lines) + "\n")
    assert read_ssh_key_file(path) == lines[2:]


def test_private_key_is_refused_naming_the_pub_file(ssh_keys):
    with pytest.raises(InputError, match="private key; pass the public key"):
        read_ssh_key_file(ssh_keys["ed25519"])


def test_bad_key_files_are_refused(tmp_path, ssh_keys):
    forged = _pub(ssh_keys["ed25519"]).replace("ssh-ed25519", "ssh-rsa", 1)  # type and blob disagree
    cases = {"empty": "", "comments": "# nothing\n", "garbage": "hello world\n", "forged": forged + "\n",
             "badbase64": "ssh-ed25519 !!!notbase64 me\n"}
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(InputError):
            read_ssh_key_file(path)
    with pytest.raises(NotFoundError):
        read_ssh_key_file(tmp_path / "absent.pub")
    assert parse_ssh_public_keys(_pub(ssh_keys["ecdsa"])) == [_pub(ssh_keys["ecdsa"])]


# --- a user's own user-data -----------------------------------------------------------------

def test_own_user_data_replaces_the_template(tmp_path):
    own = "#cloud-config\npackages: [htop]\n"
    path = tmp_path / "mine.yaml"
    path.write_text(own)
    seed = plan_seed(hostname="td", user_data=read_user_data_file(path))
    assert seed.user_data == own and not seed.default_user_data
    label, files = read_seed_iso(write_seed_iso(seed, tmp_path / "seed.iso"))
    assert files["user-data"] == own.encode()


def test_keys_with_own_user_data_are_refused_not_dropped(ssh_keys):
    with pytest.raises(InputError, match="put them in it"):
        plan_seed(hostname="td", ssh_keys=[_pub(ssh_keys["rsa"])], user_data="#cloud-config\n{}\n")


def test_own_user_data_that_cloud_init_would_ignore_is_refused(tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text("packages: [htop]\n")
    with pytest.raises(InputError, match="add '#cloud-config' as line 1"):
        read_user_data_file(path)
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match="not UTF-8"):
        read_user_data_file(binary)
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho hi\n")
    assert read_user_data_file(script).startswith("#!")


# --- the ISO ------------------------------------------------------------------------------------

@pytest.fixture
def seed_iso(tmp_path, ssh_keys):
    keys = [_pub(ssh_keys["ed25519"])]
    path = tmp_path / "seeds" / "td-seed.iso"  # the parent is created
    seed = build_seed_iso(path, hostname="td-38-00-0", user="tdx", ssh_keys=keys,
                          instance_id="6f1c1a4e-0000-4000-8000-000000000001")
    return path, seed, keys


def test_seed_iso_reads_back_with_pycdlib(seed_iso):
    path, seed, keys = seed_iso
    label, files = read_seed_iso(path)
    assert label == "cidata"
    assert sorted(files) == ["meta-data", "user-data"]
    assert files["user-data"].decode() == seed.user_data
    assert yaml.safe_load(files["user-data"])["users"][0]["ssh_authorized_keys"] == keys
    assert yaml.safe_load(files["meta-data"]) == {
        "instance-id": "6f1c1a4e-0000-4000-8000-000000000001", "local-hostname": "td-38-00-0"}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # QEMU's user must read it
    assert [p.name for p in path.parent.iterdir()] == ["td-seed.iso"]  # no temporary left


def test_blkid_finds_the_cidata_label_cloud_init_looks_for(seed_iso):
    path, _, _ = seed_iso
    result = subprocess.run(["blkid", "-p", "-o", "export", str(path)], capture_output=True, text=True, check=True)
    fields = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert (fields["TYPE"], fields["LABEL"]) == ("iso9660", "cidata")


def test_isoinfo_reads_rock_ridge_and_joliet_names(seed_iso):
    if shutil.which("isoinfo") is None:
        pytest.skip("isoinfo is not installed (Debian package genisoimage; scripts/setup installs it)")
    path, seed, _ = seed_iso
    info = subprocess.run(["isoinfo", "-d", "-i", str(path)], capture_output=True, text=True, check=True).stdout
    assert "Volume id: cidata" in info
    assert "Joliet" in info and "Rock Ridge" in info
    for extension in ("-R", "-J"):
        for name, content in (("user-data", seed.user_data), ("meta-data", seed.meta_data)):
            extracted = subprocess.run(["isoinfo", extension, "-i", str(path), "-x", f"/{name}"],
                                       capture_output=True, text=True, check=True).stdout
            assert extracted == content, (extension, name)


def test_rewriting_a_seed_replaces_it(seed_iso):
    path, _, _ = seed_iso
    seed = plan_seed(hostname="other", user_data="#cloud-config\n{}\n")
    write_seed_iso(seed, path)
    assert read_seed_iso(path)[1]["user-data"] == b"#cloud-config\n{}\n"


def test_default_instance_ids_differ_so_a_new_td_boots_first_time_again():
    first, second = plan_seed(hostname="td"), plan_seed(hostname="td")
    assert first.instance_id != second.instance_id
    assert first.instance_id.startswith("td-")


def test_unwritable_place_is_refused_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(InputError, match="cannot create"):
        build_seed_iso(blocker / "seed.iso", hostname="td")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_not_an_iso_is_refused(tmp_path):
    junk = tmp_path / "junk.iso"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(InputError, match="not a readable ISO"):
        read_seed_iso(junk)


def test_imex_channel_is_asked_for_in_the_drivers_own_option_and_cloud_init_accepts_it(tmp_path):
    """--imex-channel (issue 28): NVIDIA's driver creates IMEX channel 0 when it loads with
    NVreg_CreateImexChannel0=1; without the flag the file is not written."""
    wanted = {"path": "/etc/modprobe.d/tdxvirt-nvidia-imex.conf", "permissions": "0644"}
    with_channel = yaml.safe_load(render_user_data(hostname="td", imex_channel=True))
    [written] = [f for f in with_channel["write_files"] if f["path"] == wanted["path"]]
    assert written["permissions"] == wanted["permissions"]
    assert "options nvidia NVreg_CreateImexChannel0=1\n" in written["content"]
    without = yaml.safe_load(render_user_data(hostname="td"))
    assert wanted["path"] not in [f["path"] for f in without["write_files"]]
    rendered = tmp_path / "user-data"
    rendered.write_text(render_user_data(hostname="td", imex_channel=True))
    result = subprocess.run(["cloud-init", "schema", "--config-file", str(rendered)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "Valid cloud-config" in result.stdout, result.stdout + result.stderr


def test_imex_channel_with_own_user_data_is_refused_naming_the_option(tmp_path):
    from tdxvirt.domain.spec import TDSpec

    own = tmp_path / "mine.yaml"
    own.write_text("#cloud-config\npackages: [htop]\n")
    with pytest.raises(InputError, match="--imex-channel goes into tdxvirt's user-data"):
        TDSpec.from_user(name="td", user_data=str(own), imex_channel=True)
    assert TDSpec.from_user(name="td", imex_channel=True).cloud_init  # it implies the seed
