"""Issue #18, item 8: files the user names (--user-data, --ssh-key, kernel configs).

Root reads them. A root-only file given as --user-data once had its first 40
characters (a password hash) quoted in the error; a FIFO made `define --print-xml`
hang. Now no error quotes file content, only regular files are read (fstat on the
opened descriptor, the open itself non-blocking), and sizes are capped.
"""

from __future__ import annotations

import os
import threading

import pytest
from click.testing import CliRunner

from tdxvirt.cli import main
from tdxvirt.errors import InputError
from tdxvirt.userfile import read_user_file

SHADOW_LINE = "root:$6$s4ltS4lt$Hh4shH4shHash0123456789abcdefghijklmnop:19700:0:99999:7:::\n"


@pytest.fixture
def run(sim_uri, gpu_host):
    host, _ = gpu_host

    def invoke(*args, timeout=20):
        box = {}

        def call():
            box["result"] = CliRunner().invoke(
                main, ["-c", sim_uri, "--host-root", str(host.base), *args])

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(timeout)
        assert not worker.is_alive(), f"tdxvirt {' '.join(args)} hung"
        result = box["result"]
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert "Traceback" not in result.output
        return result

    return invoke


def _one_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdxvirt: error: "), result.output
    return lines[0]


def test_a_root_only_file_is_never_quoted(run, gpu_host, td_name, tmp_path, conn):
    _, gpu = gpu_host
    shadow = tmp_path / "shadow"
    shadow.write_text(SHADOW_LINE)
    os.chmod(shadow, 0o600)
    line = _one_line(run("define", td_name, "--gpu", gpu, "--user-data", str(shadow),
                         "--print-xml"))
    assert "does not start with '#cloud-config'" in line and str(shadow) in line
    for piece in ("root:", "$6$", "s4lt", "Hash", "19700"):
        assert piece not in line.replace(str(shadow), "")
    assert td_name not in [d.name() for d in conn.listAllDomains(0)]


def test_a_fifo_is_refused_at_once(run, gpu_host, td_name, tmp_path):
    _, gpu = gpu_host
    fifo = tmp_path / "user-data"
    os.mkfifo(fifo)  # nobody ever writes to it
    line = _one_line(run("define", td_name, "--gpu", gpu, "--user-data", str(fifo), "--print-xml"))
    assert "is a FIFO, not a regular file" in line


@pytest.mark.parametrize("option", ["--user-data", "--ssh-key"])
def test_a_device_is_refused(run, gpu_host, td_name, option):
    _, gpu = gpu_host
    line = _one_line(run("define", td_name, "--gpu", gpu, option, "/dev/zero", "--print-xml"))
    assert "/dev/zero is a character device, not a regular file" in line


def test_an_oversized_user_data_is_refused(run, gpu_host, td_name, tmp_path):
    _, gpu = gpu_host
    big = tmp_path / "user-data"
    with open(big, "w") as out:
        out.write("#cloud-config\n")
        out.write("# " + "x" * (2 * 1024 * 1024) + "\n")
    line = _one_line(run("define", td_name, "--gpu", gpu, "--user-data", str(big), "--print-xml"))
    assert "is larger than 1 MiB" in line


def test_a_symlink_to_a_regular_file_is_fine(tmp_path):
    real = tmp_path / "real"
    real.write_bytes(b"#cloud-config\n")
    link = tmp_path / "link"
    link.symlink_to(real)
    assert read_user_file(link, "user-data file") == b"#cloud-config\n"


def test_read_user_file_limits(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)
    assert read_user_file(path, "thing", limit=4096) == b"x" * 4096
    with pytest.raises(InputError, match="larger than 4095 bytes"):
        read_user_file(path, "thing", limit=4095)
    with pytest.raises(InputError, match="is a directory"):
        read_user_file(tmp_path, "thing")


def test_a_fifo_as_a_kernel_config_is_refused(tmp_path):
    from tdxvirt.kconfig import load_kernel_config

    fifo = tmp_path / "config"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="is a FIFO"):
        load_kernel_config(fifo)
