"""Values kept between runs (tdxvirt.cache): the same answers as computing them afresh,
keyed by what they derive from, and nothing but a well-formed value is believed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tdxvirt import cache
from tdxvirt.domain import tdvf


@pytest.fixture
def state(tmp_path, monkeypatch):
    directory = tmp_path / "state"
    monkeypatch.setenv("TDXVIRT_STATE_DIR", str(directory))
    tdvf._PREDICTED.clear()  # the in-process memory: each call below reads the file again
    yield directory
    tdvf._PREDICTED.clear()


@pytest.fixture
def firmware(sim, tmp_path):
    """Debian forky's TDX firmware (its ovmf-inteltdx package), a copy of our own."""
    copy = tmp_path / "OVMF.inteltdx.ms.fd"
    shutil.copyfile(sim.chroot / "usr/share/ovmf/OVMF.inteltdx.ms.fd", copy)
    return copy


def test_a_firmwares_mrtd_is_kept_by_its_digest_and_equals_the_computed_one(state, firmware):
    computed = tdvf.firmware_mrtd(firmware)[0]
    assert tdvf.predicted_mrtd(firmware) == computed
    [kept] = list((state / "cache/mrtd-v1").iterdir())
    assert kept.read_bytes() == computed.encode() and oct(kept.stat().st_mode & 0o777) == "0o600"
    tdvf._PREDICTED.clear()
    assert tdvf.predicted_mrtd(firmware) == computed  # read back
    # another firmware (one measured byte changed) is another key, never the kept value
    image = bytearray(firmware.read_bytes())
    measured = next(s for s in tdvf.parse(bytes(image), "fw") if s.attributes & 1 and s.raw_size)
    image[measured.data_offset + 0x40] ^= 0xFF
    firmware.write_bytes(image)
    tdvf._PREDICTED.clear()
    assert tdvf.predicted_mrtd(firmware) == tdvf.firmware_mrtd(firmware)[0] != computed


@pytest.mark.parametrize("stored", [b"", b"zz" * 48, b"0" * 95, b"0" * 97, b"A" * 96])
def test_a_malformed_kept_value_is_computed_again(state, firmware, stored):
    computed = tdvf.firmware_mrtd(firmware)[0]
    tdvf.predicted_mrtd(firmware)
    [kept] = list((state / "cache/mrtd-v1").iterdir())
    kept.write_bytes(stored)
    tdvf._PREDICTED.clear()
    assert tdvf.predicted_mrtd(firmware) == computed


def test_a_symlink_or_fifo_is_never_read(state):
    folder = cache.directory("probe")
    folder.mkdir(parents=True)
    os.symlink("/etc/hostname", folder / "link")
    os.mkfifo(folder / "fifo")
    assert cache.read("probe", "link") is None and cache.read("probe", "fifo") is None
    cache.write("probe", "value", b"kept")
    assert cache.read("probe", "value") == b"kept"


def test_an_unwritable_cache_costs_only_time(tmp_path, monkeypatch, firmware):
    unwritable = tmp_path / "ro"
    unwritable.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k,mode=0700", "tmpfs", str(unwritable)],
                   check=True)
    try:
        monkeypatch.setenv("TDXVIRT_STATE_DIR", str(unwritable))
        tdvf._PREDICTED.clear()
        assert tdvf.predicted_mrtd(firmware) == tdvf.firmware_mrtd(firmware)[0]
    finally:
        subprocess.run(["umount", str(unwritable)], check=True)
        tdvf._PREDICTED.clear()


def test_the_templates_compiled_code_renders_the_same_in_a_new_process(state):
    """The first process compiles and keeps the template's code; the second loads it:
    both render byte-identical XML of one golden scenario."""
    code = ("import sys; sys.path.insert(0, 'tests'); from pathlib import Path; "
            "import tempfile; from scenarios import plan_for, scenarios; "
            "from tdxvirt.domain.render import render_domain; "
            "[s] = [s for s in scenarios() if s.name == 'one-gpu']; "
            "print(render_domain(plan_for(s, Path(tempfile.mkdtemp()) / 'root')[1]))")
    env = {**os.environ, "TDXVIRT_STATE_DIR": str(state)}
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                           check=True).stdout
    assert list((state / "cache/jinja").iterdir())
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            check=True).stdout
    assert first == second and "<launchSecurity type='tdx'>" in first
