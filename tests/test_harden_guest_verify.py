"""Issue #18, item 7: `guest verify` shows the guest's own claims, escaped and capped.

A guest decides what its agent answers. Its output reaches the report capped (200
characters per value), the terminal escaped, and the results are worded as what the
guest reported: nothing a guest says is called verified.
"""

from __future__ import annotations

import json
import unicodedata

import pytest
from click.testing import CliRunner
from test_guest_verify import CC_ON_F, StandInAgent, tdx_guest

from tdxvirt.guest.verify import GuestExec, verify_guest
from tdxvirt.textsafe import GUEST_TEXT_LIMIT

FLOOD = "A" * 100_000
# Clears the screen, then paints a fake "all ok" table over the real one.
PAINT = "\x1b[2J\x1b[H\x1b[32mCHECK  RESULT\nTDX guest device  ok\r\u202e"
HOSTILE_GUEST = tdx_guest({
    ("stat", "-c", "%F", "/dev/tdx_guest"): (1, "", PAINT + FLOOD + "\n"),
    ("cat", "/proc/cmdline"): (0, "console=ttyS0 " + PAINT + FLOOD + "\n", ""),
    ("nvidia-smi", "conf-compute", "-f"): (0, CC_ON_F.replace("ON", "ON" + "\x1b]0;owned\x07"), ""),
})


def _report(programs):
    return verify_guest(GuestExec(StandInAgent(programs), timeout=5, poll=0.001), "td-1")


@pytest.fixture
def cli(monkeypatch):
    """`tdxvirt guest verify` with the stand-in guest answering."""
    from tdxvirt.cli import main

    def run(programs, *extra):
        monkeypatch.setattr("tdxvirt.guest.verify.verify_domain",
                            lambda conn, name, timeout, wait=0: _report(programs))
        monkeypatch.setattr("tdxvirt.cli.Session.conn", lambda self: None)
        result = CliRunner().invoke(main, ["-c", "test:///default", "guest", "verify", "td-1", *extra])
        assert "Traceback" not in result.output
        return result

    return run


def _controls(text: str) -> list[str]:
    return [c for c in text if c != "\n" and unicodedata.category(c) in ("Cc", "Cf")]


def test_guest_text_is_capped_in_the_report():
    report = _report(HOSTILE_GUEST)
    for check in report.checks:
        assert len(check.detail) < GUEST_TEXT_LIMIT + 100, (check.name, len(check.detail))
    cut = {c.name: c.detail for c in report.checks}["kernel argument clearcpuid=mtrr"]
    assert "more characters cut" in cut


def test_the_table_is_escaped_capped_and_worded_as_the_guests_claims(cli):
    result = cli(HOSTILE_GUEST)
    assert result.exit_code == 1
    assert _controls(result.output) == []
    assert "\\x1b[2J" in result.stdout and "\\u202e" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) < 3 * GUEST_TEXT_LIMIT + 200
    assert "reported through its agent, not verified" in result.stdout
    assert not any(line.startswith("TDX guest device") and " ok " in line
                   for line in result.stdout.splitlines()[2:])  # the painted row is text now
    assert result.stderr.count("\n") == 1


def test_a_ready_guest_is_reported_ready_not_verified(cli):
    result = cli(tdx_guest())
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "RESULT", "DETAIL"]
    assert "reported by the guest" in lines[-1] and "attest" in lines[-1]
    assert not any("verified" in line and "not verified" not in line for line in lines)


def test_json_keeps_values_exact_but_capped(cli):
    result = cli(HOSTILE_GUEST, "--json")
    data = json.loads(result.stdout)
    details = {c["check"]: c["detail"] for c in data["checks"]}
    assert details["TDX guest device"].startswith("no /dev/tdx_guest (" + PAINT.split("\n")[0])
    assert all(len(d) < GUEST_TEXT_LIMIT + 100 for d in details.values())
