"""Every OS error where tdxvirt writes is one line, and leaves libvirt and the disk
agreeing (issue 25): a full and a read-only state directory and storage directory (real
tmpfs mounts), too few file descriptors (a real RLIMIT_NOFILE at every limit around the
moment define runs out), and a quota (EDQUOT, which needs quotas this machine cannot
set up: os.open made to answer it for the state directory, the code above real)."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
from pathlib import Path

import pytest
from conftest import TDXVIRT, cli_runner, one_line_error


@pytest.fixture
def place(tmp_path):
    """(base image, environment, overlay directory, state directory, mount helper)."""
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "32M"], check=True)
    images, state = tmp_path / "img", tmp_path / "state"
    for folder in (images, state):
        folder.mkdir(mode=0o700)
    config = tmp_path / "config.toml"
    config.write_text(f'[defaults]\noverlay_dir = "{images}"\n')
    mounted = []

    def mount(folder: Path, options: str) -> None:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"{options},mode=0700", "tmpfs", str(folder)],
                       check=True)
        mounted.append(folder)
        if "ro" not in options.split(","):  # fill it: the next block written fails
            subprocess.run(["dd", "if=/dev/zero", f"of={folder}/fill", "bs=4k"],
                           stderr=subprocess.DEVNULL)

    env = {**os.environ, "TDXVIRT_CONFIG": str(config), "TDXVIRT_STATE_DIR": str(state)}
    yield base, env, images, state, mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def _define(sim_uri, host, gpu, name, base, env, limit=None):
    def lowered():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return subprocess.run([TDXVIRT, "-c", sim_uri, "--host-root", str(host.base), "define", name,
                           "--gpu", gpu, "--allow-shared", "--memory", "1G", "--image", str(base),
                           "--image-format", "qcow2"], capture_output=True, text=True, env=env,
                          preexec_fn=lowered if limit else None, timeout=120)


def _consistent(conn, name: str, images: Path) -> bool:
    """Defined with its overlay, or not defined and nothing of it on disk."""
    defined = name in [d.name() for d in conn.listAllDomains(0)]
    return sorted(os.listdir(images)) == ([f"{name}.qcow2"] if defined else [])


FULL_OR_READ_ONLY = {
    "state directory full": ("state", "size=16k", "cannot"),
    "state directory read-only": ("state", "ro,size=16k", "Read-only file system"),
    "storage directory full": ("img", "size=64k", "No space left on device"),
    "storage directory read-only": ("img", "ro,size=64k", "Read-only file system"),
}


@pytest.mark.parametrize("case", sorted(FULL_OR_READ_ONLY))
def test_a_full_or_read_only_directory_is_one_line_and_leaves_nothing(case, place, sim_uri, conn,
                                                                      gpu_host, td_name):
    base, env, images, state, mount = place
    which, options, says = FULL_OR_READ_ONLY[case]
    mount(images if which == "img" else state, options)
    host, gpu = gpu_host
    done = _define(sim_uri, host, gpu, td_name, base, env)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdxvirt: error: ") and says in lines[0], done.stderr
    assert td_name not in [d.name() for d in conn.listAllDomains(0)]
    assert [f for f in os.listdir(images) if f != "fill"] == []


def test_too_few_file_descriptors_is_one_line_at_every_limit(place, sim_uri, conn, gpu_host, tmp_path):
    """From a limit where tdxvirt cannot even start its work to one where define
    succeeds, each run either defines the TD with its overlay or fails in one line
    leaving nothing; the first success is undefined again before the next limit."""
    base, env, images, _, _ = place
    host, gpu = gpu_host
    outcomes = []
    for limit in range(10, 24):
        name = f"fd-{limit}-{tmp_path.name[-6:]}"
        done = _define(sim_uri, host, gpu, name, base, env, limit=limit)
        if done.returncode == 0:
            outcomes.append("defined")
        else:
            line = one_line_error_text(done)
            assert "Too many open files" in line or "ulimit" in line or "cannot" in line, line
            outcomes.append("refused")
        assert _consistent(conn, name, images), (limit, done.stderr)
        if done.returncode == 0:
            removed = subprocess.run([TDXVIRT, "-c", sim_uri, "undefine", name, "--remove-storage"],
                                     env=env, capture_output=True, text=True)
            assert removed.returncode == 0 and os.listdir(images) == [], removed.stderr
    assert outcomes[0] == "refused" and outcomes[-1] == "defined", outcomes


def one_line_error_text(done) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdxvirt: error: "), done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


@pytest.mark.parametrize("code", [errno.EDQUOT, errno.ENOSPC, errno.EROFS, errno.EMFILE])
def test_any_write_into_the_state_directory_failing_is_one_line(code, place, sim_uri, conn,
                                                                gpu_host, td_name, monkeypatch):
    """Every file define opens for writing below the state directory (locks, intent,
    created-file records, the TD record, caches) answers ``code`` in turn: one line
    each time, and libvirt and the disk still agree."""
    base, env, images, state, _ = place
    host, gpu = gpu_host
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    real_open = os.open
    writes = []

    def counting(path, flags, *args, **kwargs):
        if str(path).startswith(str(state)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            writes.append(str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting)
    run = cli_runner(sim_uri, host.base)
    assert run("define", td_name, "--gpu", gpu, "--allow-shared", "--memory", "1G", "--image",
               str(base), "--image-format", "qcow2").exit_code == 0
    count = len(writes)
    assert count >= 3  # locks, the intent, the created-file record at least
    assert run("undefine", td_name, "--remove-storage").exit_code == 0
    for failing in range(count):
        seen = []

        def failing_open(path, flags, *args, **kwargs):
            if str(path).startswith(str(state)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                seen.append(path)
                if len(seen) == failing + 1:
                    raise OSError(code, os.strerror(code), str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", failing_open)
        result = run("define", td_name, "--gpu", gpu, "--allow-shared", "--memory", "1G", "--image",
                     str(base), "--image-format", "qcow2")
        monkeypatch.setattr(os, "open", real_open)
        if result.exit_code != 0:
            one_line_error(result, result.exit_code)
        assert _consistent(conn, td_name, images), (failing, result.output)
        if result.exit_code == 0:
            assert run("undefine", td_name, "--remove-storage").exit_code == 0
