"""``guest attest`` end to end: evidence through the guest-agent protocol, checks, the CLI.

No TD can run here, so for the quote path the guest agent is a stand-in: the one of
test_guest_verify (qemu-ga's guest-exec protocol) with qemu-ga's file commands
(guest-file-open/-read/-write/-close, base64 both ways, errors in qemu-ga's words) and
a guest kernel's configfs-tsm behind them (a report directory per mkdir; ``provider``,
``inblob``, ``generation`` counting writes, ``outblob``), serving a recorded real quote
(dcap-qvl's sample, tests/data/quotes) whatever REPORTDATA was written: a replayed
quote, which the REPORTDATA check must catch. The GPU answers are the real H100
``nvidia-smi conf-compute`` outputs of test_guest_verify; nvattest's answers have the
fields NVIDIA documents for ``nvattest attest`` (``result_code``, ``result_message``:
docs.nvidia.com/attestation/nv-attestation-cli, "attest"). The domain side runs on the
real libvirt daemon; the real agent path, up to the configfs-tsm read, runs in a TCG
guest with a real qemu-ga (test_guest_live_agent's guest), which has no TDX and must say
so in one line.
"""

from __future__ import annotations

import base64
import json

import pytest
from click.testing import CliRunner
from conftest import one_line_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_attest_eventlog import EV_SEPARATOR, quote_with, real_ccel, records, tpm_boot  # noqa: F401 (fixtures)
from test_attest_quote import V4, V4_COLLATERAL, V4_VALID_AT, matching
from test_guest_live_agent import agent_guest_files, running_guest  # noqa: F401 (fixtures)
from test_guest_verify import CC_OFF_F, CC_ON_F, MALFORMED_REPLIES, CorruptedReply, StandInAgent
from test_guest_verify import _define as define_test_domain
from test_rtmr import guest_files  # noqa: F401 (fixture, for the real event log)

from tdxvirt.attest import dcap as dcap_verifier
from tdxvirt.attest.checks import FAIL, NOT_CHECKED, PASS, no_predictions
from tdxvirt.attest.eventlog import parse_event_log
from tdxvirt.attest.evidence import CC_STATUS, CCEL_DATA, EVENT_LOG_LIMIT, NVATTEST, TSM_REPORTS, collect
from tdxvirt.attest.quote import parse_quote
from tdxvirt.attest.report import CollateralSource, attest_domain, attest_guest
from tdxvirt.guest import GuestNotReadyError
from tdxvirt.guest.verify import AgentCommandError, GuestExec

REPORTDATA = parse_quote(V4).report_data  # what the recorded quote carries
NO_SUCH = "No such file or directory"
MOUNTS_WITH_CONFIGFS = "sysfs /sys sysfs rw 0 0\nconfigfs /sys/kernel/config configfs rw 0 0\n"


def _agent_error(command: str, desc: str) -> AgentCommandError:
    """An agent error as libvirt raises it (qemuAgentCheckError wraps qemu-ga's desc)."""
    return AgentCommandError(f"internal error: unable to execute QEMU agent command '{command}': {desc}")


class TdAgent(StandInAgent):
    """qemu-ga in a TD: guest-exec from a table, file commands on a simulated configfs-tsm."""

    def __init__(self, quote: bytes = V4, programs: dict | None = None, provider: str = "tdx_guest",
                 ccel: bytes | None = None, outblob_error: str | None = None, other_writers: int = 0,
                 has_tsm: bool = True, is_td: bool = True, configfs_mounted: bool = True,
                 files_disabled: bool = False, inblob_refused: str | None = None, rmdir_refused: str | None = None,
                 generation: str | None = None, hung: frozenset = frozenset()):
        table = {
            ("stat", "-c", "%F", TSM_REPORTS): (0, "directory\n", "") if has_tsm else
            (1, "", f"stat: cannot statx '{TSM_REPORTS}': {NO_SUCH}\n"),
            ("stat", "-c", "%F", "/dev/tdx_guest"): (0, "character special file\n", "") if is_td else
            (1, "", f"stat: cannot statx '/dev/tdx_guest': {NO_SUCH}\n"),
            ("cat", "/proc/mounts"): (0, MOUNTS_WITH_CONFIGFS if configfs_mounted else "sysfs /sys sysfs rw 0 0\n", ""),
            ("nvidia-smi", "conf-compute", "-f"): (0, CC_ON_F, ""),
        }
        table.update(programs or {})
        super().__init__({argv: answer for argv, answer in table.items() if answer is not None}, hung=hung)
        self.quote, self.provider, self.ccel = quote, provider, ccel
        self.inblob_refused = inblob_refused  # the kernel's errno text when it refuses inblob at release
        self.rmdir_refused = rmdir_refused  # rmdir's stderr when the directory cannot be removed
        self.generation = generation  # what the generation attribute reads, instead of the count
        self.outblob_error, self.other_writers = outblob_error, other_writers
        self.files_disabled = files_disabled  # qemu-ga --block-rpcs guest-file-*
        self.reports: dict[str, dict] = {}  # report directory -> its attributes
        self.made: list[str] = []
        self.removed: list[str] = []
        self.handles: dict[int, list] = {}  # handle -> [path, mode, data, read offset]
        self._next_handle = 1000

    def _exec_effect(self, argv: tuple[str, ...]) -> None:
        if argv[0] == "mkdir" and argv[1].startswith(TSM_REPORTS + "/"):
            self.reports[argv[1]] = {"inblob": None, "generation": self.other_writers}
            self.made.append(argv[1])
            self.programs[argv] = (0, "", "")
        elif argv[0] == "rmdir" and argv[1] in self.reports and self.rmdir_refused:
            self.programs[argv] = (1, "", self.rmdir_refused)
        elif argv[0] == "rmdir" and argv[1] in self.reports:
            del self.reports[argv[1]]
            self.removed.append(argv[1])
            self.programs[argv] = (0, "", "")

    def _attribute(self, path: str) -> tuple[dict, str] | None:
        directory, _, name = path.rpartition("/")
        return (self.reports[directory], name) if directory in self.reports else None

    def _read_file(self, path: str) -> bytes:
        found = self._attribute(path)
        if found:
            report, name = found
            if name == "provider":
                return f"{self.provider}\n".encode()
            if name == "generation":
                return f"{self.generation or report['generation']}\n".encode()
            if name == "outblob":
                if self.outblob_error:
                    raise _agent_error("guest-file-read", f"failed to read file: {self.outblob_error}")
                return self.quote
        if path == CCEL_DATA and self.ccel is not None:
            return self.ccel
        raise _agent_error("guest-file-open", f"failed to open file '{path}' (mode: 'r'): {NO_SUCH}")

    def command(self, request: str, timeout: int) -> str:
        message = json.loads(request)
        execute, arguments = message["execute"], message.get("arguments", {})
        if execute == "guest-exec":
            self._exec_effect((arguments["path"], *arguments["arg"]))
            return super().command(request, timeout)
        if not execute.startswith("guest-file-"):
            return super().command(request, timeout)
        self.requests.append(message)
        if self.files_disabled:
            raise _agent_error(execute, f"The command {execute} has been disabled for this instance")
        if execute == "guest-file-open":
            path, mode = arguments["path"], arguments["mode"]
            data = b""
            if mode == "r":
                if not (self._attribute(path) and path.endswith("/outblob")):
                    data = self._read_file(path)  # outblob fails at read time, as the kernel's does
            elif not (self._attribute(path) and path.endswith("/inblob")):
                raise _agent_error("guest-file-open", f"failed to open file '{path}' (mode: '{mode}'): "
                                                      "Permission denied")
            self._next_handle += 1
            self.handles[self._next_handle] = [path, mode, data, 0]
            return json.dumps({"return": self._next_handle})
        if arguments.get("handle") not in self.handles:  # qemu-ga's words (qga/commands-posix.c)
            raise _agent_error(execute, f"handle '{arguments.get('handle')}' has not been found")
        handle = self.handles[arguments["handle"]]
        if execute == "guest-file-read":
            if handle[0].endswith("/outblob") and handle[3] == 0 and not handle[2]:
                handle[2] = self._read_file(handle[0])
            chunk = handle[2][handle[3]:handle[3] + arguments["count"]]
            handle[3] += len(chunk)
            return json.dumps({"return": {"count": len(chunk), "buf-b64": base64.b64encode(chunk).decode(),
                                          "eof": handle[3] >= len(handle[2])}})
        if execute == "guest-file-write":  # qemu-ga's buffered fwrite: the kernel sees it at fclose
            data = base64.b64decode(arguments["buf-b64"])
            handle[2] += data
            return json.dumps({"return": {"count": len(data), "eof": False}})
        if execute == "guest-file-close":
            del self.handles[arguments["handle"]]
            if handle[1] == "w":  # configfs commits a binary attribute when the file is released
                if self.inblob_refused:
                    raise _agent_error(execute, f"failed to close handle: {self.inblob_refused}")
                report, _ = self._attribute(handle[0])
                report["inblob"] = handle[2]
                report["generation"] += 1
            return json.dumps({"return": {}})
        raise AssertionError(f"attest sent an unexpected agent command {execute}")


def _guest(agent) -> GuestExec:
    return GuestExec(agent, timeout=5, poll=0.001, name="TD 'td-1'")


def _file_source() -> CollateralSource:
    return CollateralSource(collateral=dcap_verifier.load_collateral(str(V4_COLLATERAL)))


def _results(report) -> dict:
    return {check.name: check.result for check in report.checks}


# --- evidence through the agent protocol ---------------------------------------------------------

def test_the_quote_request_writes_the_nonce_and_cleans_up():
    agent = TdAgent()
    nonce = bytes(range(32))
    evidence = collect(_guest(agent), nonce, gpus=1)
    assert evidence.quote == V4 and evidence.provider == "tdx_guest" and evidence.generation == 1
    [made] = agent.made
    assert made.startswith(f"{TSM_REPORTS}/tdxvirt-") and agent.removed == [made]
    assert agent.reports == {} and agent.handles == {}  # directory removed, every file closed
    written = [r for r in agent.requests if r["execute"] == "guest-file-write"]
    assert [base64.b64decode(r["arguments"]["buf-b64"]) for r in written] == [nonce + b"\0" * 32]
    assert evidence.event_log is None and CCEL_DATA in evidence.event_log_note and NO_SUCH in evidence.event_log_note


def test_a_recorded_quote_passes_every_quote_check_for_its_own_reportdata():
    agent = TdAgent()  # the recorded quote's TD left no CCEL with it
    report = attest_guest(_guest(agent), "td-1", REPORTDATA, matching(V4), _file_source(), gpus=1, now=V4_VALID_AT)
    results = _results(report)
    quote_checks = ["quote format", "REPORTDATA is the nonce", "TD debug off", "MRTD", "RTMR0", "RTMR1",
                    "RTMR2", "RTMR3", "quote signature (DCAP)", "platform TCB"]
    assert [results[name] for name in quote_checks] == [PASS] * len(quote_checks)
    assert results["GPU CC mode (guest-reported)"] == PASS
    assert results["event log replay"] == NOT_CHECKED  # no log: said why
    assert results["GPU attestation (guest-run verifier)"] == NOT_CHECKED
    assert report.ok and [c.name for c in report.not_checked] == [
        "event log replay", "GPU attestation (guest-run verifier)", "GPU evidence nonce",
        "GPU evidence (host-verified)"]
    data = report.as_dict()
    assert data["evidence"]["event_log_bytes"] is None and data["replayed_events"] is None
    assert data["collateral"]["valid_until"] == "2025-07-19 10:00:35 UTC"
    assert "nvattest" in data["evidence"]["gpu"]["verifier_note"] and NO_SUCH in data["evidence"]["gpu"]["verifier_note"]


def test_a_fresh_nonce_catches_the_replayed_recorded_quote():
    report = attest_guest(_guest(TdAgent()), "td-1", b"\x5a" * 64, matching(V4), _file_source(), now=V4_VALID_AT)
    assert [c.name for c in report.failed] == ["REPORTDATA is the nonce"]
    assert report.failure_message() == ("TD 'td-1' failed attestation: REPORTDATA is the nonce "
                                        "(see the table above)")


def test_gpu_cc_off_and_a_failing_verifier_fail_with_the_guests_words():
    programs = {("nvidia-smi", "conf-compute", "-f"): (0, CC_OFF_F, ""),
                NVATTEST: (1, json.dumps({"result_code": 14, "result_message": "RIM verification failed"}), "")}
    report = attest_guest(_guest(TdAgent(programs=programs)), "td-1", REPORTDATA, matching(V4), CollateralSource())
    checks = {c.name: c for c in report.checks}
    assert checks["GPU CC mode (guest-reported)"].result == FAIL
    assert checks["GPU CC mode (guest-reported)"].detail.startswith("nvidia-smi in the guest: CC status: OFF: ")
    assert checks["GPU attestation (guest-run verifier)"].result == FAIL
    assert checks["GPU attestation (guest-run verifier)"].detail == "nvattest in the guest failed: RIM verification failed"
    assert checks["quote signature (DCAP)"].result == NOT_CHECKED
    assert checks["quote signature (DCAP)"].detail.startswith("no collateral: give --collateral FILE")


def test_a_passing_nvattest_and_no_gpu_tools():
    programs = {NVATTEST: (0, json.dumps({"result_code": 0, "result_message": "Ok"}), "")}
    report = attest_guest(_guest(TdAgent(programs=programs)), "td-1", REPORTDATA, matching(V4), CollateralSource())
    checks = {c.name: c for c in report.checks}
    assert checks["GPU attestation (guest-run verifier)"].result == PASS
    assert checks["GPU attestation (guest-run verifier)"].detail == "nvattest (local verifier) in the guest: Ok"
    bare = attest_guest(_guest(TdAgent(programs={("nvidia-smi", "conf-compute", "-f"): None})), "td-1",
                        REPORTDATA, matching(V4), CollateralSource())
    check = {c.name: c for c in bare.checks}["GPU CC mode (guest-reported)"]
    assert check.result == NOT_CHECKED and check.detail.startswith("nvidia-smi did not run in the guest: Failed to execute")
    no_device = attest_guest(_guest(TdAgent(programs={("nvidia-smi", "conf-compute", "-f"): (6, "No devices were found\n", "")})),
                             "td-1", REPORTDATA, matching(V4), CollateralSource())
    check = {c.name: c for c in no_device.checks}["GPU CC mode (guest-reported)"]
    assert check.result == NOT_CHECKED
    assert check.detail == "nvidia-smi conf-compute -f in the guest gave no CC status: No devices were found"
    no_gpu = attest_guest(_guest(TdAgent()), "td-1", REPORTDATA, matching(V4), CollateralSource(), gpus=0)
    assert {c.detail for c in no_gpu.checks if c.name.startswith("GPU")} == {"the TD has no GPU passed through"}


def test_a_pccs_that_cannot_be_reached_leaves_the_signature_not_checked():
    source = CollateralSource(pccs_url="https://127.0.0.1:1")
    report = attest_guest(_guest(TdAgent()), "td-1", REPORTDATA, matching(V4), source)
    check = {c.name: c for c in report.checks}["quote signature (DCAP)"]
    assert check.result == NOT_CHECKED
    assert check.detail.startswith("cannot fetch collateral from PCCS https://127.0.0.1:1: ")
    assert not report.failed and not report.ok  # nothing failed, but nothing is proven either
    assert "signature was not verified" in report.failure_message()


@pytest.mark.parametrize("agent, message", [
    (TdAgent(has_tsm=False, is_td=False), "has no /sys/kernel/config/tsm/report (stat: cannot statx "
     "'/sys/kernel/config/tsm/report': No such file or directory) and no /dev/tdx_guest, so it is not running "
     "as an Intel TDX TD"),
    (TdAgent(has_tsm=False, configfs_mounted=False), "is a TD but configfs is not mounted"),
    (TdAgent(has_tsm=False), "is a TD but its kernel offers no configfs-tsm reports"),
    (TdAgent(provider="sev_guest"), "attestation provider is 'sev_guest', not tdx_guest"),
    (TdAgent(outblob_error="Input/output error"), "could not get a quote (failed to read file: Input/output "
     "error); the host's quote generation service must run"),
    (TdAgent(other_writers=1), "while tdxvirt used it (generation 2, expected 1); attest again"),
    (TdAgent(quote=b""), "returned an empty quote"),
    (TdAgent(quote=V4 * 14), "is larger than 65536 bytes"),
    (TdAgent(files_disabled=True), "The command guest-file-open has been disabled for this instance; allow "
     "guest-file-open, -read, -write and -close in the agent's configuration"),
])
def test_a_guest_that_cannot_give_a_quote_says_why_in_one_line(agent, message):
    with pytest.raises(GuestNotReadyError) as error:
        collect(_guest(agent), b"nonce")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert agent.reports == {}  # any report directory made was removed again


# --- malformed agent replies, refusals and failures after the quote (review findings) ----------------

QUOTE_CHECKS = ["quote format", "REPORTDATA is the nonce", "TD debug off", "MRTD", "RTMR0", "RTMR1", "RTMR2",
                "RTMR3", "quote signature (DCAP)", "platform TCB"]


@pytest.mark.parametrize("execute, reply, words", [
    ("guest-file-open", '{"error": "no"}', "answered guest-file-open with an error without a description: \"no\""),
    ("guest-file-open", '{"return": "1001"}', "answered guest-file-open with a handle that is not an integer: \"1001\""),
    ("guest-file-open", '{"return": true}', "a handle that is not an integer: true"),
    ("guest-file-open", "<html>", "answered guest-file-open with text that is not JSON"),
    ("guest-file-read", '{"return": []}', "answered guest-file-read with a result that is not an object: []"),
    ("guest-file-read", '{"return": {"count": 3, "buf-b64": "!!!!", "eof": true}}', "'buf-b64' not base64"),
    ("guest-file-read", '{"return": {"count": 4, "buf-b64": "eA==", "eof": true}}',
     "a count that is not the 1 bytes it sent: 4"),
    ("guest-file-read", '{"return": {"count": "1", "buf-b64": "eA==", "eof": true}}', "no count or eof"),
    ("guest-file-read", '{"return": {"count": 1, "buf-b64": 120, "eof": true}}', "'buf-b64' not a string: 120"),
    ("guest-file-read", '{"id": 1}', "answered guest-file-read with neither a result nor an error"),
    ("guest-file-write", '{"return": {"count": "64"}}', "answered guest-file-write with no count"),
])
def test_a_malformed_file_reply_is_one_line_and_the_request_is_removed(execute, reply, words):
    agent = TdAgent()
    with pytest.raises(GuestNotReadyError) as error:
        collect(_guest(CorruptedReply(agent, reply, execute=execute)), b"nonce")
    assert words in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert agent.reports == {}  # the report directory was removed
    # every file tdxvirt knew the handle of was closed (an unreadable open reply loses its handle)
    assert len(agent.handles) == (1 if execute == "guest-file-open" else 0)


def test_a_nonce_the_kernel_refuses_at_close_is_an_error():
    agent = TdAgent(inblob_refused="Invalid argument")
    with pytest.raises(GuestNotReadyError) as error:
        collect(_guest(agent), b"nonce")
    [made] = agent.made
    assert str(error.value) == (
        f"the kernel in TD 'td-1' refused the nonce (REPORTDATA) written to {made}/inblob (failed to close "
        "handle: Invalid argument); nothing was attested: attest again, and see the guest's kernel log if it persists")
    assert agent.reports == {} and agent.handles == {}
    # the quote was never asked for: no outblob read after the refusal
    assert not any(r["arguments"].get("path", "").endswith("/outblob") for r in agent.requests
                   if r["execute"] == "guest-file-open")


@pytest.mark.parametrize("generation, expected", [("\u00b2", None), ("1\u0663", None), ("+1", None), ("1", 1)])
def test_a_generation_that_is_not_ascii_digits_is_unknown_not_a_crash(generation, expected):
    assert collect(_guest(TdAgent(generation=generation)), b"nonce").generation == expected


@pytest.mark.parametrize("code", ["false", "0.0", '"0"', "null"])
def test_only_the_integer_0_is_a_passing_nvattest_result_code(code):
    answer = '{"result_code": %s, "result_message": "Ok"}' % code
    evidence = collect(_guest(TdAgent(programs={NVATTEST: (0, answer, "")})), b"nonce")
    assert evidence.gpu.verifier is False and evidence.gpu.verifier_note == "nvattest in the guest failed: Ok"


def test_failures_after_the_quote_leave_those_rows_not_checked_and_the_quote_checked():
    agent = TdAgent(ccel=b"\x01" * (EVENT_LOG_LIMIT + 1), programs={NVATTEST: (0, "{}", "")},
                    hung=frozenset({CC_STATUS, NVATTEST}))
    guest = GuestExec(agent, timeout=0.3, poll=0.001, name="TD 'td-1'")
    report = attest_guest(guest, "td-1", REPORTDATA, matching(V4), _file_source(), gpus=1, now=V4_VALID_AT)
    checks = {c.name: c for c in report.checks}
    assert [checks[name].result for name in QUOTE_CHECKS] == [PASS] * len(QUOTE_CHECKS)
    assert checks["event log replay"].result == NOT_CHECKED
    assert checks["event log replay"].detail == (f"no CC event log: {CCEL_DATA} in TD 'td-1' is larger than "
                                                 f"{EVENT_LOG_LIMIT} bytes; that is not what the kernel returns there")
    cc, verifier = checks["GPU CC mode (guest-reported)"], checks["GPU attestation (guest-run verifier)"]
    assert cc.result == verifier.result == NOT_CHECKED
    assert cc.detail == ("nvidia-smi did not run in the guest: nvidia-smi conf-compute -f did not finish within "
                         "0.3 s in TD 'td-1'; is the guest overloaded or hung?")
    assert verifier.detail.startswith("NVIDIA's attestation CLI (nvattest) did not run in the guest: nvattest attest")
    assert agent.reports == {} and agent.handles == {}


def test_a_report_directory_left_behind_is_a_note_not_a_failure():
    refusal = f"rmdir: failed to remove '{TSM_REPORTS}/x': Device or resource busy\n"
    agent = TdAgent(rmdir_refused=refusal)
    report = attest_guest(_guest(agent), "td-1", REPORTDATA, matching(V4), _file_source(), gpus=1, now=V4_VALID_AT)
    assert report.ok  # the quote is what it is: a leftover request directory changes none of it
    [made] = agent.made
    assert report.evidence.notes == (f"the report request {made} was left in TD 'td-1' ({refusal.strip()}); "
                                     "it holds no secret: remove it in the guest with rmdir",)
    assert report.as_dict()["evidence"]["notes"] == list(report.evidence.notes)
    assert list(agent.reports) == [made]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nth=st.integers(min_value=0, max_value=24), reply=MALFORMED_REPLIES)
def test_any_malformed_reply_gives_evidence_or_one_line_never_a_crash(nth, reply):
    agent = TdAgent(ccel=b"TCG event log bytes", programs={NVATTEST: (0, '{"result_code": 0}', "")})
    corrupted = CorruptedReply(agent, reply, nth=nth)
    try:
        evidence = collect(_guest(corrupted), REPORTDATA, gpus=1)
    except GuestNotReadyError as error:
        assert "\n" not in str(error)
    else:
        assert evidence.quote == V4
    assert agent.reports == {}  # nothing left in the guest
    assert len(agent.handles) <= (1 if corrupted.replaced == "guest-file-open" else 0)


# --- the domain side and the CLI, on the real libvirt daemon --------------------------------------

def _define(conn, name: str, channel: bool = True, running: bool = True):
    return define_test_domain(conn, name, channel, running)


def _main():
    from tdxvirt.cli import main
    from tdxvirt.cli.guest import guest

    if "guest" not in main.commands:
        main.add_command(guest)
    return main


@pytest.fixture
def agent_behind_libvirt(monkeypatch):
    """The test driver has no guest agents: its channel is replaced by the stand-in, so
    everything above the agent transport (lookup, checks, printing, exit codes) is real."""
    agent = TdAgent()
    monkeypatch.setattr("tdxvirt.guest.verify.LibvirtAgentChannel", lambda domain, uri="": agent)
    return agent


def test_attest_domain_refuses_a_stopped_td_and_a_td_without_an_agent(conn, td_name):
    _define(conn, td_name, running=False)
    with pytest.raises(GuestNotReadyError, match=f"`tdxvirt start {td_name}`"):
        attest_domain(conn, td_name, b"n", lambda xml: no_predictions("x"), CollateralSource(), 5)
    conn.lookupByName(td_name).undefine()
    _define(conn, td_name, channel=False)
    with pytest.raises(GuestNotReadyError, match="has no QEMU guest agent channel"):
        attest_domain(conn, td_name, b"n", lambda xml: no_predictions("x"), CollateralSource(), 5)


def test_cli_prints_each_check_and_fails_on_expired_collateral(sim_uri, conn, td_name, agent_behind_libvirt):
    _define(conn, td_name)
    result = CliRunner().invoke(_main(), ["-c", sim_uri, "guest", "attest", td_name, "--nonce", REPORTDATA.hex(),
                                          "--collateral", str(V4_COLLATERAL)])
    line = one_line_error(result, 1)
    assert line == f"tdxvirt: error: TD '{td_name}' failed attestation: quote signature (DCAP) (see the table above)"
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "RESULT", "DETAIL"]
    signature = next(row for row in lines if row.startswith("quote signature (DCAP)"))
    assert " fail " in signature and "collateral expired on 2025-07-19 10:00:35 UTC" in signature
    mrtd = next(row for row in lines if row.startswith("MRTD"))
    assert "not-checked" in mrtd and "names no firmware" in mrtd  # a test-driver domain has no TDX firmware
    assert f"Nonce (REPORTDATA): {REPORTDATA.hex()}" in lines
    assert agent_behind_libvirt.removed == agent_behind_libvirt.made != []


def test_cli_json_follows_the_schema(sim_uri, conn, td_name, agent_behind_libvirt):
    _define(conn, td_name)
    result = CliRunner().invoke(_main(), ["-c", sim_uri, "guest", "attest", td_name, "--json"])
    assert result.exit_code == 1  # a random nonce: the recorded quote is a replay
    data = json.loads(result.stdout)
    assert set(data) == {"domain", "ok", "verified", "bound", "firmware_matched", "nonce", "verification_time",
                         "checks", "quote", "collateral", "evidence", "replayed_events"}
    assert data["bound"] is False  # a test-driver domain root has no record of
    assert data["replayed_events"] is None  # no CCEL in this guest
    assert data["domain"] == td_name and data["ok"] is False and len(bytes.fromhex(data["nonce"])) == 64
    assert {c["result"] for c in data["checks"]} <= {"pass", "fail", "not-checked"}
    assert all(set(c) == {"check", "result", "detail"} for c in data["checks"])
    assert data["quote"]["mr_td"] == parse_quote(V4).mr_td.hex() and data["quote"]["version"] == 4
    assert data["collateral"] is None
    assert set(data["evidence"]) == {"provider", "quote_bytes", "quote_base64", "generation", "event_log_bytes",
                                     "event_log_note", "gpu", "notes"}
    assert data["evidence"]["notes"] == []  # the report directory was removed
    assert base64.b64decode(data["evidence"]["quote_base64"]) == V4  # kept, for verifying elsewhere


def test_cli_pccs_from_the_config_file(sim_uri, conn, td_name, agent_behind_libvirt, tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text('[defaults]\npccs_url = "https://127.0.0.1:1"\n')
    monkeypatch.setenv("TDXVIRT_CONFIG", str(config))
    _define(conn, td_name)
    result = CliRunner().invoke(_main(), ["-c", sim_uri, "guest", "attest", td_name, "--nonce", REPORTDATA.hex(),
                                          "--json"])
    assert result.exit_code == 1, result.output  # nothing failed, but the signature is unverified
    assert "is not attested: the quote's signature was not verified" in result.stderr
    checks = {c["check"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["quote signature (DCAP)"]["result"] == "not-checked"
    assert checks["quote signature (DCAP)"]["detail"].startswith("cannot fetch collateral from PCCS https://127.0.0.1:1")


def test_cli_usage_errors_change_nothing_in_the_guest(sim_uri, conn, td_name, agent_behind_libvirt, tmp_path):
    _define(conn, td_name)
    main = _main()
    for nonce, words in (("xyz", "hex digits"), ("00" * 65, "1 to 64 bytes; this one is 65")):
        result = CliRunner().invoke(main, ["-c", sim_uri, "guest", "attest", td_name, "--nonce", nonce])
        assert words in one_line_error(result, 2)
    not_url = CliRunner().invoke(main, ["-c", sim_uri, "guest", "attest", td_name, "--pccs-url", "pccs:8081"])
    assert "give the PCCS as an http(s):// URL" in one_line_error(not_url, 2)
    missing = CliRunner().invoke(main, ["-c", sim_uri, "guest", "attest", td_name, "--collateral",
                                        str(tmp_path / "none.json")])
    assert "none.json does not exist" in one_line_error(missing, 2)
    assert agent_behind_libvirt.requests == []  # the guest was never asked
    unknown = CliRunner().invoke(main, ["-c", sim_uri, "guest", "attest", "no-such-td-anywhere"])
    assert "no domain named" in one_line_error(unknown, 2)


# --- the real agent path in a TCG guest: no TDX, said so --------------------------------------------

def test_a_real_guest_agent_in_a_guest_without_tdx(qemu_conn, running_guest):  # noqa: F811 (fixture)
    with pytest.raises(GuestNotReadyError) as error:
        attest_domain(qemu_conn, running_guest, b"\x01" * 64, lambda xml: no_predictions("x"),
                      CollateralSource(), timeout=60)
    message = str(error.value)
    assert message.startswith(f"TD '{running_guest}' cannot produce a TD quote: it has no /sys/kernel/config/tsm/report")
    assert "no /dev/tdx_guest, so it is not running as an Intel TDX TD" in message and "\n" not in message


def test_cli_attest_in_a_guest_without_tdx(qemu_conn, running_guest, sim):  # noqa: F811 (fixture)
    result = CliRunner().invoke(_main(), ["-c", sim.qemu_uri, "guest", "attest", running_guest])
    line = one_line_error(result, 1)
    assert "is not running as an Intel TDX TD" in line and result.stdout == ""


def test_the_config_files_pccs_url_must_be_a_url(tmp_path, monkeypatch):
    from tdxvirt.config import load_config
    from tdxvirt.errors import InputError

    config = tmp_path / "config.toml"
    monkeypatch.setenv("TDXVIRT_CONFIG", str(config))
    config.write_text('[defaults]\npccs_url = "https://pccs.example:8081"\n')
    assert load_config().pccs_url == "https://pccs.example:8081"
    config.write_text('[defaults]\npccs_url = "/srv/pccs"\n')
    with pytest.raises(InputError, match="defaults.pccs_url must be an http\\(s\\):// URL string"):
        load_config()


def test_a_verified_quote_without_an_mrtd_prediction_is_not_attested():
    """A signature that verifies proves the quote came from a TDX module, not which
    firmware runs: without MRTD compared the exit code says not attested."""
    agent = TdAgent()
    report = attest_guest(_guest(agent), "td-1", REPORTDATA, no_predictions("the firmware is on the remote host"),
                          _file_source(), gpus=1, now=V4_VALID_AT)
    assert report.verified and not report.failed and not report.ok
    assert "MRTD was not compared with a prediction" in report.failure_message()
    assert "--firmware FILE" in report.failure_message()


# --- the CC event log replayed against the quote (a real firmware's log, see test_attest_eventlog) ---

def test_a_ccel_that_replays_to_the_quote_passes_and_its_events_are_reported(real_ccel, tpm_boot, guest_files):  # noqa: F811
    log = parse_event_log(real_ccel)
    quote = quote_with(log.replay())  # the recorded quote with the log's RTMRs: its signature breaks
    report = attest_guest(_guest(TdAgent(quote=quote, ccel=real_ccel)), "td-1", REPORTDATA, matching(quote),
                          _file_source(), gpus=1, now=V4_VALID_AT)
    checks = {c.name: c for c in report.checks}
    assert checks["event log replay"].result == PASS
    assert checks["event log replay"].detail.startswith(f"the event log's {len(log.events)} events (")
    assert checks["quote signature (DCAP)"].result == FAIL  # the stand-in quote's RTMRs were rewritten
    events = report.as_dict()["replayed_events"]
    assert [e["number"] for e in events] == [e.number for e in log.events if e.rtmr is not None]
    assert set(events[0]) == {"number", "register", "index", "type", "digest", "description"}
    [kernel] = [e for e in events if e["type"] == "EV_EFI_BOOT_SERVICES_APPLICATION"]
    from tdxvirt.domain.bootmeasure import authenticode_sha384
    assert kernel["register"] == "RTMR1" and kernel["digest"] == authenticode_sha384(guest_files[0].read_bytes())


def test_a_ccel_that_does_not_replay_fails_naming_the_register(real_ccel, tpm_boot):  # noqa: F811
    log = parse_event_log(real_ccel)
    quote = quote_with(log.replay())
    _, found = records(real_ccel.rstrip(b"\xff"))
    first = next(e for e in log.events if e.kind == EV_SEPARATOR and e.rtmr == 0)
    start = found[first.number - 1][0]
    tampered = real_ccel[:start] + b"\x03" + real_ccel[start + 1:]  # its index moved from RTMR0 (1) to RTMR2 (3)
    report = attest_guest(_guest(TdAgent(quote=quote, ccel=tampered)), "td-1", REPORTDATA, matching(quote),
                          _file_source(), now=V4_VALID_AT)
    check = {c.name: c for c in report.checks}["event log replay"]
    assert check.result == FAIL and check.detail.startswith("RTMR0 replayed from the event log's ")
    assert report.as_dict()["replayed_events"] is None
    garbage = attest_guest(_guest(TdAgent(ccel=b"TCG event log bytes")), "td-1", REPORTDATA, matching(V4),
                           _file_source(), now=V4_VALID_AT)
    check = {c.name: c for c in garbage.checks}["event log replay"]
    assert check.result == FAIL and "does not start with the Spec ID event" in check.detail
    assert [c.name for c in garbage.failed] == ["event log replay"]  # the recorded quote itself still passes


def test_cli_reports_the_replay(sim_uri, conn, td_name, agent_behind_libvirt, real_ccel, tpm_boot):  # noqa: F811
    _define(conn, td_name)
    log = parse_event_log(real_ccel)
    agent_behind_libvirt.quote, agent_behind_libvirt.ccel = quote_with(log.replay()), real_ccel
    arguments = ["-c", sim_uri, "guest", "attest", td_name, "--nonce", REPORTDATA.hex()]
    result = CliRunner().invoke(_main(), arguments + ["--json"])
    data = json.loads(result.stdout)
    replay = next(c for c in data["checks"] if c["check"] == "event log replay")
    assert replay["result"] == "pass" and "replay to the quote's RTMR0-2" in replay["detail"]
    assert len(data["replayed_events"]) == sum(len(log.extending(i)) for i in range(3))
    text = CliRunner().invoke(_main(), arguments)
    row = next(line for line in text.stdout.splitlines() if line.startswith("event log replay"))
    assert " pass " in row

    agent_behind_libvirt.ccel = real_ccel[:len(real_ccel.rstrip(b"\xff")) - 2]  # the last record cut short
    failed = CliRunner().invoke(_main(), arguments)
    assert "event log replay" in one_line_error(failed, 1)
    row = next(line for line in failed.stdout.splitlines() if line.startswith("event log replay"))
    assert " fail " in row and "the CC event log is truncated" in row


def test_a_loader_a_libvirt_user_swapped_fails_the_references_and_predicts_from_the_record(
        sim, sim_uri, conn, td_name, agent_behind_libvirt, tmp_path):
    """The review's attack: a libvirt user points <loader> at a one-byte-modified OVMF.
    The prediction stays the one of the firmware root recorded, and the swap fails the
    references check by name (exit 1), whatever else passes."""
    import shutil

    from lxml import etree

    from tdxvirt.domain.record import local_store
    from tdxvirt.domain.recorded import record_from
    from tdxvirt.domain.tdvf import firmware_mrtd

    root = tmp_path / "host"
    genuine = root / "usr/share/ovmf/OVMF.inteltdx.fd"
    genuine.parent.mkdir(parents=True)
    shutil.copyfile(sim.chroot / "usr/share/ovmf/OVMF.inteltdx.ms.fd", genuine)
    evil = bytearray(genuine.read_bytes())
    evil[len(evil) // 2] ^= 0xFF
    (root / "tmp").mkdir()
    (root / "tmp/evil-ovmf.fd").write_bytes(evil)
    domain = _define(conn, td_name, running=False)
    xml = etree.fromstring(domain.XMLDesc(0).encode())
    etree.SubElement(xml.find("os"), "loader", type="rom").text = "/usr/share/ovmf/OVMF.inteltdx.fd"
    domain = conn.defineXML(etree.tostring(xml).decode())
    local_store().write(record_from(domain.XMLDesc(0), domain.UUIDString()))  # root's define
    try:
        xml.find("os/loader").text = "/tmp/evil-ovmf.fd"  # the libvirt user's edit
        conn.defineXML(etree.tostring(xml).decode()).create()  # the test driver has no hook
        result = CliRunner().invoke(_main(), ["-c", sim_uri, "--host-root", str(root), "guest", "attest",
                                              td_name, "--nonce", REPORTDATA.hex(), "--json"])
        assert result.exit_code == 1
        checks = {c["check"]: c for c in json.loads(result.stdout)["checks"]}
        assert checks["references"]["result"] == "fail"
        assert ("<loader> is /tmp/evil-ovmf.fd, root's record says /usr/share/ovmf/OVMF.inteltdx.fd"
                in checks["references"]["detail"])
        recorded_mrtd = firmware_mrtd(str(genuine), "single-pass")[0]
        assert f"differs from {recorded_mrtd} (predicted from the firmware " \
               "/usr/share/ovmf/OVMF.inteltdx.fd)" in checks["MRTD"]["detail"]
    finally:
        local_store().remove(domain.UUIDString())


class TricklingAgent(TdAgent):
    """A hostile guest: its agent answers every guest-file-read with one byte (8.4
    million agent calls for an 8 MiB event log, each up to --timeout through libvirt)."""

    def command(self, request: str, timeout: int) -> str:
        message = json.loads(request)
        if message["execute"] == "guest-file-read":
            message["arguments"]["count"] = 1
            request = json.dumps(message)
        return super().command(request, timeout)


def test_a_guest_that_trickles_one_byte_a_reply_is_stopped_at_once():
    import time

    agent = TricklingAgent(ccel=b"\0" * (1 << 20))
    started = time.monotonic()
    with pytest.raises(GuestNotReadyError, match="returned 1 bytes of .* before its end: a stalling agent"):
        collect(_guest(agent), REPORTDATA, gpus=0)
    assert time.monotonic() - started < 5
    assert len([r for r in agent.requests if r["execute"] == "guest-file-read"]) < 10



def _gpu_evidence(nonce_hex: str, devices: int = 1) -> str:
    """nvattest collect-evidence's answer, with the fields NVIDIA documents (evidences:
    version, arch, nonce, vbios_version, driver_version, evidence, certificate)."""
    return json.dumps({"evidences": [{"version": "1.0", "arch": "HOPPER", "nonce": nonce_hex,
                                      "vbios_version": "96.00.88.00.11", "driver_version": "580.65.06",
                                      "evidence": "EeAB", "certificate": "LS0t"}] * devices,
                       "result_code": 0, "result_message": "Ok"})


def test_the_gpu_evidence_is_bound_to_this_quotes_nonce():
    """The GPU signs its report over a nonce derived from the quote's REPORTDATA: evidence
    made for another request (replayed by a hostile guest) fails by name."""
    from tdxvirt.attest.checks import report_data_for
    from tdxvirt.attest.evidence import gpu_nonce, nvattest_collect

    expected = gpu_nonce(report_data_for(REPORTDATA))
    assert len(bytes.fromhex(expected)) == 32  # SPDM's nonce
    for answer, result, words in (
            (_gpu_evidence(expected, devices=2), PASS, "evidence of 2 device(s) carries the nonce derived"),
            (_gpu_evidence("00" * 32), FAIL, "replayed, or made for another request"),
            ("not json", NOT_CHECKED, "gave no evidence")):
        agent = TdAgent(programs={nvattest_collect(expected): (0, answer, ""),
                                  NVATTEST: (0, json.dumps({"result_code": 0, "result_message": "Ok"}), "")})
        report = attest_guest(_guest(agent), "td-1", REPORTDATA, matching(V4), _file_source(), gpus=1,
                              now=V4_VALID_AT)
        check = {c.name: c for c in report.checks}["GPU evidence nonce"]
        assert check.result == result and words in check.detail, check
        assert report.ok is (result != FAIL)
        host = {c.name: c for c in report.checks}["GPU evidence (host-verified)"]
        assert host.result == NOT_CHECKED and "needs NVIDIA's RIM and OCSP services" in host.detail
