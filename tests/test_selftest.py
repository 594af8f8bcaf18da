"""`tdxvirt selftest` where a step fails (issue 29): the failed step names the cause, the
steps that needed it are skipped naming it, and the throw-away TD and its files are gone
afterwards. (The passing run, after `host setup`, is in tests/test_zz_one_host.py.)"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from conftest import TDXVIRT


def _selftest(*args, timeout=600) -> tuple[int, dict]:
    done = subprocess.run([TDXVIRT, "--sim", "selftest", "--json", *args], capture_output=True,
                          text=True, timeout=timeout)
    return done.returncode, json.loads(done.stdout)


def _steps(report: dict) -> dict[str, dict]:
    return {step["name"]: step for step in report["steps"]}


def _nothing_left(qemu_conn, report: dict) -> None:
    assert report["td"] not in qemu_conn.listDefinedDomains()
    assert not list(Path("/var/lib/tdxvirt/images").glob(f"{report['td']}*"))
    assert not list(Path("/tmp").glob("tdxvirt-selftest-*"))  # the guest disk built for the run


def test_a_guest_that_never_answers_fails_at_the_agent_and_leaves_nothing(qemu_conn, cc_on):
    directory = Path(tempfile.mkdtemp(prefix="tdxvirt-noboot-", dir="/tmp"))
    directory.chmod(0o755)
    blank = directory / "blank.qcow2"  # boots nothing: the firmware finds no OS
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(blank), "64M"], check=True)
    blank.chmod(0o644)
    try:
        code, report = _selftest("--image", str(blank), "--boot-timeout", "15")
    finally:
        subprocess.run(["rm", "-rf", str(directory)])
    steps = _steps(report)
    assert code == 1 and report["ok"] is False
    assert steps["start"]["status"] == "pass"
    assert steps["guest agent"]["status"] == "fail"
    assert "no guest agent within 15 s" in steps["guest agent"]["detail"]
    # how far it booted, from its console through libvirt: OVMF found nothing to boot
    assert any("No bootable option or device was found" in line for line in report["console_log"])
    assert not any("\x1b" in line for line in report["console_log"])  # screen codes dropped
    assert "qemu-guest-agent" in steps["guest agent"]["remedy"]
    for name in ("TDX inside the guest", "attestation", "MMIO window", "reboot"):
        assert steps[name]["status"] == "skip" and "did not answer" in steps[name]["detail"]
    assert steps["undefine"]["status"] == "pass"
    _nothing_left(qemu_conn, report)


def test_cc_mode_off_fails_the_start_naming_the_mode_and_leaves_nothing(qemu_conn, cc_off):
    code, report = _selftest("--boot-timeout", "30")
    steps = _steps(report)
    assert code == 1
    assert steps["define"]["status"] == "pass" and steps["root's record"]["status"] == "pass"
    assert steps["start"]["status"] == "fail" and "CC mode off" in steps["start"]["detail"]
    assert "guest agent" not in steps  # nothing after a failed start but the clean-up
    assert steps["undefine"]["status"] == "pass"
    _nothing_left(qemu_conn, report)


def test_bad_options_are_one_line_and_define_nothing(qemu_conn):
    before = set(qemu_conn.listDefinedDomains())
    for args, says in ((["--gpu", "38:00.0", "--no-gpu"], "give one of them"),
                       (["--image", "/nonexistent.qcow2"], "no such file"),
                       (["--gpu", "zz:00.0"], "zz:00.0")):
        done = subprocess.run([TDXVIRT, "--sim", "selftest", *args], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and says in done.stderr, done.stderr
    assert set(qemu_conn.listDefinedDomains()) == before


IN_MOVED_TO = 0x80


def test_a_td_stripped_between_define_and_start_fails_the_start_naming_the_edit(sim, qemu_conn, cc_on):
    """Another tool strips the throw-away TD mid-run: selftest is stopped (SIGSTOP) the
    moment root's record of its TD lands (an inotify event, not a timed race), virt-xml
    deletes the TD's <launchSecurity> as a user of virt-manager could, and selftest goes
    on. Its start is refused naming the edit and the way back, nothing after it runs,
    and the TD is gone after."""
    import signal

    from test_faults import _deletions
    from test_integrity import virt_xml

    from tdxvirt.domain.record import records_dir

    names, fd = _deletions(records_dir(), IN_MOVED_TO)
    try:
        process = subprocess.Popen([TDXVIRT, "--sim", "selftest", "--json", "--no-gpu"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stripped = None
        for entry in names:
            if entry.endswith(".json") and not entry.startswith("."):
                process.send_signal(signal.SIGSTOP)
                try:
                    stripped = qemu_conn.lookupByUUIDString(entry.removesuffix(".json")).name()
                    virt_xml(sim, stripped, "--edit", "--xml", "xpath.delete=./launchSecurity")
                finally:
                    process.send_signal(signal.SIGCONT)
                break
        out, err = process.communicate(timeout=300)
    finally:
        import os

        os.close(fd)
    report = json.loads(out)
    steps = _steps(report)
    assert stripped == report["td"] and process.returncode == 1
    assert steps["start"]["status"] == "fail"
    assert "<launchSecurity type='tdx'> was removed" in steps["start"]["detail"]
    assert "tdxvirt repair" in steps["start"]["detail"] + steps["start"]["remedy"]
    assert "guest agent" not in steps
    assert steps["undefine"]["status"] == "pass"
    assert err.count("\n") == 1 and "selftest failed at " in err
    _nothing_left(qemu_conn, report)


def test_the_console_tail_keeps_the_last_lines_of_a_hostile_guest_safe():
    """Guests are hostile: the kept bytes are bounded, escape sequences dropped, other
    controls shown escaped, long lines cut; a report's code block cannot be closed."""
    from tdxvirt.guest.console_tail import ConsoleTail
    from tdxvirt.lifecycle.selftest import _fenced

    class GuestStream:  # what libvirt's console stream hands over, in recv's chunks
        def __init__(self, data: bytes):
            self.chunks = [data[i:i + 4096] for i in range(0, len(data), 4096)]

        def recv(self, size):
            return self.chunks.pop(0) if self.chunks else b""

    tail = ConsoleTail(limit=4096)
    tail._read(GuestStream(b"\x1b[2J\x1b[1;1Hfirmware\r\n" + b"x" * 10_000
                           + b"\r\nlast \x07bell\x1b]0;title\x07\n"))
    assert len(tail._buffer) == 4096
    lines = tail.lines(5)
    assert lines[-1] == "last \\x07bell"
    assert lines[0].startswith("xxx") and lines[0].endswith("more characters cut)")
    assert _fenced("text", ["```", "a ````` b"]) == ["``````text", "```", "a ````` b", "``````"]


H100_RESOURCE = Path(__file__).resolve().parents[1] / "tdxvirt/sim/data/h100-sxm5-80gb/sysfs/resource"


def test_the_mmio_step_reads_the_guests_bars_against_the_hosts_gpu():
    """The real H100's resource table as its guest saw it: every BAR placed, the 128 GiB
    BAR as on the host. A BAR the firmware could not place, a guest kernel that shrank the
    large BAR (reported for a B200 under a 6.8 kernel), and a hostile answer each fail."""
    from tdxvirt.lifecycle.selftest import guest_bar_problems

    real = H100_RESOURCE.read_text()
    assert guest_bar_problems({"0000:01:00.0": real}, 128 << 30) == (
        "pass", "every BAR of 1 NVIDIA device(s) has an address in the guest, the largest "
                "128G as on the host")
    unplaced = real.replace("0x0000100000000000 0x0000101fffffffff",
                            "0x0000000000000000 0x0000001fffffffff")
    status, detail, remedy = guest_bar_problems({"0000:01:00.0": unplaced}, 128 << 30)
    assert status == "fail" and "no address for 0000:01:00.0 BAR2" in detail and "--mmio-window" in remedy
    shrunk = real.replace("0x0000101fffffffff", "0x00001001ffffffff")  # 8 GiB
    status, detail, remedy = guest_bar_problems({"0000:01:00.0": shrunk}, 256 << 30)
    assert status == "fail" and "largest BAR of 8G where the host's GPU has 256G" in detail
    assert "newer guest kernel" in remedy
    assert guest_bar_problems({"0000:01:00.0": "\x1b[2J not a table\n"}, None)[0] == "fail"
