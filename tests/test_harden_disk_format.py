"""Issue #18, item 4: disk formats are declared, never guessed, and backing chains checked.

The attack: a guest writes a qcow2 header naming a backing file (any host file) into
its raw disk. Guessed as qcow2 from that header, the next TD using the file would read
the host file through it. tdxvirt now takes --disk-format / --image-format (default
raw, as libvirt assumes), reads the file with ``qemu-img info -f FORMAT``, and refuses
a file with a backing file unless --allow-backing-file.
"""

from __future__ import annotations

import hashlib
import subprocess

import pytest
from conftest import cli_runner
from lxml import etree

from tdxvirt.domain.spec import TDSpec
from tdxvirt.errors import InputError


@pytest.fixture
def victim(tmp_path):
    """A host file the hostile header names as its backing file."""
    path = tmp_path / "host-secret.raw"
    path.write_bytes(b"host secret\n" + b"\0" * 4084)
    return path


@pytest.fixture
def hostile(tmp_path, victim):
    """A 'raw' guest disk whose content is a qcow2 header with a backing file."""
    path = tmp_path / "guest-disk.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(victim), "-F", "raw",
                    str(path)], check=True)
    assert path.read_bytes()[:4] == b"QFI\xfb"
    return path


@pytest.fixture
def run(sim_uri, gpu_host, tmp_path, monkeypatch):
    host, _ = gpu_host
    config = tmp_path / "config.toml"
    config.write_text(f'[defaults]\noverlay_dir = "{tmp_path / "images"}"\n')
    monkeypatch.setenv("TDXVIRT_CONFIG", str(config))
    return cli_runner(sim_uri, host.base)


def _digests(*paths):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def _disk_type(xml: str) -> str:
    return etree.fromstring(xml.encode()).find("devices/disk/driver").get("type")


def _one_error_line(result, code=2):
    assert result.exit_code == code, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdxvirt: error: "), result.output
    return lines[0]


def test_raw_default_never_turns_a_qcow2_header_into_a_backing_chain(run, gpu_host, hostile,
                                                                     victim, td_name, conn):
    _, gpu = gpu_host
    before = _digests(hostile, victim)
    result = run("define", td_name, "--gpu", gpu, "--disk", str(hostile))
    assert result.exit_code == 0, result.output
    xml = conn.lookupByName(td_name).XMLDesc(0)
    assert _disk_type(xml) == "raw" and str(victim) not in xml
    warning = [line for line in result.stderr.splitlines() if "qcow2 header" in line]
    assert len(warning) == 1 and "--disk-format qcow2" in warning[0]
    assert _digests(hostile, victim) == before


def test_declared_qcow2_with_a_backing_file_is_refused_in_one_line(run, gpu_host, hostile, victim,
                                                                   td_name, conn):
    _, gpu = gpu_host
    before = _digests(hostile, victim)
    line = _one_error_line(run("define", td_name, "--gpu", gpu, "--disk", str(hostile),
                               "--disk-format", "qcow2"))
    assert "has a backing file" in line and "--allow-backing-file" in line
    assert td_name not in [d.name() for d in conn.listAllDomains(0)]
    assert _digests(hostile, victim) == before


def test_print_xml_refuses_it_too(run, gpu_host, hostile, td_name):
    _, gpu = gpu_host
    line = _one_error_line(run("define", td_name, "--gpu", gpu, "--disk", str(hostile),
                               "--disk-format", "qcow2", "--print-xml"))
    assert "has a backing file" in line


def test_image_with_a_backing_file_makes_no_overlay(run, gpu_host, hostile, victim, td_name,
                                                    tmp_path, conn):
    _, gpu = gpu_host
    before = _digests(hostile, victim)
    line = _one_error_line(run("define", td_name, "--gpu", gpu, "--image", str(hostile),
                               "--image-format", "qcow2"))
    assert "--image" in line and "has a backing file" in line
    images = tmp_path / "images"
    assert not images.exists() or list(images.iterdir()) == []
    assert td_name not in [d.name() for d in conn.listAllDomains(0)]
    assert _digests(hostile, victim) == before


def test_the_user_may_opt_in_to_a_backing_file(run, gpu_host, hostile, td_name, conn, tmp_path):
    _, gpu = gpu_host
    result = run("define", td_name, "--gpu", gpu, "--image", str(hostile), "--image-format",
                 "qcow2", "--allow-backing-file")
    assert result.exit_code == 0, result.output
    overlay = tmp_path / "images" / f"{td_name}.qcow2"
    info = subprocess.run(["qemu-img", "info", "--output=json", "-f", "qcow2", str(overlay)],
                          capture_output=True, text=True, check=True).stdout
    assert '"backing-filename-format": "qcow2"' in info  # -F from the declared format
    assert _disk_type(conn.lookupByName(td_name).XMLDesc(0)) == "qcow2"


def test_a_backing_chain_link_without_its_format_is_refused_even_with_the_opt_in(
        run, gpu_host, hostile, td_name, tmp_path):
    """QEMU would probe a backing file whose format the chain does not name."""
    _, gpu = gpu_host
    data = bytearray(hostile.read_bytes())
    at = data.find(b"\xe2\x79\x2a\xca", 0, 4096)  # qcow2's backing-format header extension
    assert at > 0
    data[at:at + 4] = b"\x12\x34\x56\x78"  # now an unknown extension: no backing format
    unnamed = tmp_path / "unnamed.qcow2"
    unnamed.write_bytes(bytes(data))
    line = _one_error_line(run("define", td_name, "--gpu", gpu, "--disk", str(unnamed),
                               "--disk-format", "qcow2", "--allow-backing-file", "--print-xml"))
    assert "does not name the format of its backing file" in line


def test_a_real_qcow2_is_used_as_declared_and_never_guessed(run, gpu_host, tmp_path, td_name):
    _, gpu = gpu_host
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    declared = run("define", td_name, "--gpu", gpu, "--disk", str(disk), "--disk-format",
                   "qcow2", "--print-xml")
    assert declared.exit_code == 0 and _disk_type(declared.stdout) == "qcow2"
    assert declared.stderr == ""
    undeclared = run("define", td_name, "--gpu", gpu, "--disk", str(disk), "--print-xml")
    assert undeclared.exit_code == 0 and _disk_type(undeclared.stdout) == "raw"
    assert "qcow2 header" in undeclared.stderr


def test_a_raw_file_declared_qcow2_is_one_clear_line(run, gpu_host, tmp_path, td_name):
    _, gpu = gpu_host
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * 65536)
    line = _one_error_line(run("define", td_name, "--gpu", gpu, "--disk", str(disk),
                               "--disk-format", "qcow2", "--print-xml"))
    assert "cannot read it as qcow2" in line and "--disk-format raw" in line


@pytest.mark.parametrize("options, message", [
    ({"disk_format": "qcow2"}, "--disk-format is the format of --disk"),
    ({"image_format": "raw"}, "--image-format is the format of --image"),
    ({"allow_backing_file": True}, "--allow-backing-file applies to --disk or --image"),
    ({"disk": "DISK", "disk_format": "vmdk"}, "invalid --disk-format 'vmdk'"),
    ({"disk": "DISK", "image_format": "qcow2"}, "--image-format is the format of --image"),
])
def test_format_options_are_checked(tmp_path, options, message):
    disk = tmp_path / "d.raw"
    disk.write_bytes(b"\0" * 512)
    options = {k: str(disk) if v == "DISK" else v for k, v in options.items()}
    with pytest.raises(InputError, match=message):
        TDSpec.from_user(name="x", gpus=["38:00.0"], **options)


def test_the_cli_offers_only_raw_and_qcow2(run, gpu_host, tmp_path, td_name):
    _, gpu = gpu_host
    disk = tmp_path / "d.raw"
    disk.write_bytes(b"\0" * 512)
    line = _one_error_line(run("define", td_name, "--gpu", gpu, "--disk", str(disk),
                               "--disk-format", "vmdk"))
    assert "'vmdk' is not one of 'raw', 'qcow2'" in line
