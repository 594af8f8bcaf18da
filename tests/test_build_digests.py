"""Artifact digests: real files, a FIFO, /dev/zero; recorded by a real build, checked by status.

The build is test_build_runner's tiny QEMU (real git, git am, make); status reads the
record and the files as they are on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading

import pytest
from click.testing import CliRunner
from test_build_runner import Sources, library_run, provide_qemu_libraries

from tdxvirt.build import artifacts, digests
from tdxvirt.cli import TdxvirtGroup
from tdxvirt.cli.build import build


def test_digest_of_a_regular_file_and_through_a_symlink(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # more than one read block, not a multiple of it
    file = tmp_path / "OVMF.fd"
    file.write_bytes(data)
    (tmp_path / "link.fd").symlink_to(file)
    expected = digests.Digest(hashlib.sha256(data).hexdigest(), len(data))
    assert digests.digest(file) == expected
    assert digests.digest(tmp_path / "link.fd") == expected
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert digests.digest(empty) == digests.Digest(hashlib.sha256(b"").hexdigest(), 0)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "OVMF.fd"
    os.mkfifo(fifo)
    outcome = {}
    # a reader that blocked would never return: run it in a thread and bound the wait
    worker = threading.Thread(target=lambda: outcome.update(error=_error_of(fifo)), daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "digest() blocked on a FIFO"
    assert outcome["error"] == f"{fifo} is not a regular file (a FIFO)"


def test_devices_folders_missing_and_oversized_files_are_refused(tmp_path):
    assert _error_of("/dev/zero") == "/dev/zero is not a regular file (a character device)"
    assert _error_of(tmp_path) == f"{tmp_path} is not a regular file (a folder)"
    assert _error_of(tmp_path / "nope") == f"{tmp_path / 'nope'} is missing"
    big = tmp_path / "big"
    big.write_bytes(b"x" * 4097)
    with pytest.raises(digests.DigestError, match=r"is 4097 bytes, more than the 4096 an artifact may be"):
        digests.digest(big, limit=4096)
    assert digests.digest(big, limit=4097).size == 4097


def test_check_compares_with_the_recorded_digest(tmp_path):
    file = tmp_path / "qemu"
    file.write_bytes(b"built\n")
    recorded = digests.digest(file).to_json()
    assert digests.check(str(file), recorded).state == "ok"
    file.write_bytes(b"built\n")  # same bytes, rewritten: still the build's
    assert digests.check(str(file), recorded).ok
    file.write_bytes(b"other\n")  # same size, other bytes
    changed = digests.check(str(file), recorded)
    assert changed.state == "changed"
    assert changed.detail.startswith(f"{file} changed since it was recorded: sha256 {recorded['sha256'][:16]} (6 bytes)")
    assert digests.check(str(file), None).state == "unrecorded"
    file.unlink()
    assert digests.check(str(file), recorded).state == "missing"
    os.mkfifo(file)
    assert digests.check(str(file), recorded).state == "unreadable"
    assert digests.check(str(tmp_path), None).state == "ok"  # a folder artifact (modules dir)


def _error_of(path) -> str:
    with pytest.raises(digests.DigestError) as caught:
        digests.digest(path)
    return str(caught.value)


@pytest.fixture(autouse=True)
def qemu_libraries(tmp_path, monkeypatch):
    provide_qemu_libraries(tmp_path / "pkgconfig", monkeypatch)


def _status(*args):
    result = CliRunner().invoke(TdxvirtGroup(name="tdxvirt", commands={"build": build}), ["build", "status", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_a_build_records_digests_and_status_flags_a_replaced_or_missing_file(tmp_path, state):
    sources = Sources(tmp_path)
    manifest = sources.manifest(tmp_path / "m.toml", ["--enable-kvm"])
    workdir = tmp_path / "work"
    library_run(manifest, workdir, state)
    binary = workdir / "src/qemu/build/qemu-system-x86_64"
    built = binary.read_bytes()
    entry = artifacts.load(artifacts.record_file(state))["qemu"]
    assert entry["digests"] == {"qemu-system-x86_64": {"sha256": hashlib.sha256(built).hexdigest(),
                                                       "size": len(built)}}
    status = _status()
    assert status.exit_code == 0
    row = next(line for line in status.output.splitlines() if line.startswith("qemu"))
    assert hashlib.sha256(built).hexdigest()[:16] in row and str(len(built)) in row
    assert "NOT AS BUILT" not in status.output

    # another file at the same path: flagged in one line naming both digests
    binary.write_bytes(b"#!/bin/sh\necho not the build\n")
    replaced = hashlib.sha256(binary.read_bytes()).hexdigest()
    status = _status()
    flagged = [line for line in status.output.splitlines() if line.startswith("NOT AS BUILT")]
    assert flagged == [f"NOT AS BUILT: qemu qemu-system-x86_64: {binary} changed since it was recorded: "
                       f"sha256 {hashlib.sha256(built).hexdigest()[:16]} ({len(built)} bytes) then, "
                       f"{replaced[:16]} ({binary.stat().st_size} bytes) now; "
                       "remove it, then `tdxvirt build run qemu` builds and records it again"]
    assert f"{binary} (changed)" in status.output
    checks = json.loads(_status("--json").output)["qemu"]["checks"]
    assert checks["qemu-system-x86_64"]["state"] == "changed"

    # a run that builds nothing keeps the digest of what was built: the replaced file
    # does not become the build's
    summary, _ = library_run(manifest, workdir, state)
    assert summary.executed == []
    summary, _ = library_run(manifest, workdir, state, update=True)  # fetches, finds nothing new
    assert summary.executed == ["tdx-linux.fetch", "qemu.fetch"]
    assert artifacts.load(artifacts.record_file(state))["qemu"]["digests"]["qemu-system-x86_64"]["sha256"] == \
        hashlib.sha256(built).hexdigest()

    # gone: the build step runs again and records the new file's digest
    binary.unlink()
    assert (f"NOT AS BUILT: qemu qemu-system-x86_64: {binary} no longer exists; "
            "`tdxvirt build run qemu` builds and records it again") in _status().output.splitlines()
    summary, _ = library_run(manifest, workdir, state)
    assert summary.executed == ["qemu.build"]
    rebuilt = artifacts.load(artifacts.record_file(state))["qemu"]["digests"]["qemu-system-x86_64"]
    assert rebuilt == {"sha256": hashlib.sha256(binary.read_bytes()).hexdigest(), "size": binary.stat().st_size}
    assert "NOT AS BUILT" not in _status().output


def test_a_record_from_before_digests_says_so(tmp_path, state):
    file = tmp_path / "OVMF.fd"
    file.write_bytes(b"firmware")
    (state / "build").mkdir(parents=True)
    (state / "build/artifacts.json").write_text(json.dumps(
        {"ovmf": {"artifacts": {"OVMF.fd": str(file)}, "ref": "edk2-stable202605"}}))
    status = _status()
    assert status.exit_code == 0
    assert (f"no digest: ovmf OVMF.fd: no digest was recorded for {file} (built by an older tdxvirt)"
            in status.output.splitlines())
