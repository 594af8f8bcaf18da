"""``guest verify``: the guest-agent protocol and the checks, against a stand-in guest.

No TD with an H100 can run here, so the guest agent is a stand-in: it speaks the agent's
JSON protocol (guest-exec, then guest-exec-status polled until the program exits, output
base64-encoded, as qemu-ga does) and answers with the real ``nvidia-smi conf-compute``
outputs of an H100 with CC off (tdxvirt/sim/data/h100-sxm5-80gb, from shared/fixtures).
The "CC on" outputs are those same files with the state word changed (``ON``, ``ready``),
the format NVIDIA documents for a GPU in CC mode. Kernel log lines are those a TDX guest
prints (arch/x86/mm/mem_encrypt.c). The domain side runs against the real libvirt daemon.
"""

from __future__ import annotations

import base64
import itertools
import json
from importlib import resources

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdxvirt.errors import LibvirtOperationError, NotFoundError
from tdxvirt.guest import GuestNotReadyError
from tdxvirt.guest.verify import (
    AGENT_CHANNEL_XML,
    AgentCommandError,
    GuestExec,
    agent_channel_state,
    verify_domain,
    verify_guest,
)

H100 = resources.files("tdxvirt.sim").joinpath("data/h100-sxm5-80gb")
CC_OFF_F = H100.joinpath("nvidia-smi-conf-compute-f.txt").read_text()
CC_OFF_GRS = H100.joinpath("nvidia-smi-conf-compute-grs.txt").read_text()
CC_ON_F = CC_OFF_F.replace("OFF", "ON")
CC_ON_GRS = CC_OFF_GRS.replace("not-ready", "ready")

TDX_DMESG = """\
[    0.000000] tdx: Guest detected
[    0.000000] Linux version 6.8.0-49-generic (buildd@lcy02-amd64-103) #49-Ubuntu SMP
[    0.000000] Command line: BOOT_IMAGE=/vmlinuz-6.8.0-49-generic root=/dev/vda1 ro console=ttyS0 clearcpuid=mtrr
[    1.448893] process: using TDX aware idle routine
[    1.448893] Memory Encryption Features active: Intel TDX
[    3.939523] systemd[1]: Detected confidential virtualization tdx.
[    9.112233] nvidia: loading out-of-tree module taints kernel.
"""
PLAIN_DMESG = """\
[    0.000000] Linux version 6.8.0-49-generic (buildd@lcy02-amd64-103) #49-Ubuntu SMP
[    0.000000] Command line: BOOT_IMAGE=/vmlinuz-6.8.0-49-generic root=/dev/vda1 ro console=ttyS0
[    0.013370] Hypervisor detected: KVM
"""
TDX_CMDLINE = "BOOT_IMAGE=/vmlinuz-6.8.0-49-generic root=/dev/vda1 ro console=ttyS0 clearcpuid=mtrr\n"
PLAIN_CMDLINE = "BOOT_IMAGE=/vmlinuz-6.8.0-49-generic root=/dev/vda1 ro console=ttyS0\n"


def _crypto(*names: str) -> str:
    return "".join(f"name         : {name}\ndriver       : {name}-generic\nmodule       : kernel\n"
                   f"priority     : 100\ntype         : akcipher\n\n" for name in names)


LSMOD_NVIDIA = """\
Module                  Size  Used by
nvidia_uvm           4956160  0
nvidia              89698304  1 nvidia_uvm
ecdh_generic           16384  1 nvidia
ecdsa_generic          16384  1 nvidia
ecc                    45056  2 ecdh_generic,ecdsa_generic
virtio_net             77824  0
"""
LSMOD_PLAIN = """\
Module                  Size  Used by
virtio_net             77824  0
"""
NO_TDX_DEVICE = (1, "", "stat: cannot statx '/dev/tdx_guest': No such file or directory\n")
TDX_DEVICE = (0, "character special file\n", "")


def tdx_guest(changes: dict | None = None) -> dict:
    """A TD whose GPU is in CC mode and ready: program argv -> (exit code, stdout, stderr)."""
    guest = {
        ("stat", "-c", "%F", "/dev/tdx_guest"): TDX_DEVICE,
        ("dmesg",): (0, TDX_DMESG, ""),
        ("cat", "/proc/cmdline"): (0, TDX_CMDLINE, ""),
        ("cat", "/proc/crypto"): (0, _crypto("ecdsa-nist-p256", "ecdsa-nist-p384", "ecdh-nist-p384"), ""),
        ("lsmod",): (0, LSMOD_NVIDIA, ""),
        ("nvidia-smi", "conf-compute", "-f"): (0, CC_ON_F, ""),
        ("nvidia-smi", "conf-compute", "-grs"): (0, CC_ON_GRS, ""),
    }
    guest.update(changes or {})
    return {argv: answer for argv, answer in guest.items() if answer is not None}


# What verify may run: all read-only. "-srs" (set ready state) or anything else would fail.
READ_ONLY = {("stat", "-c", "%F", "/dev/tdx_guest"), ("dmesg",), ("cat", "/proc/cmdline"),
             ("cat", "/proc/crypto"), ("lsmod",), ("nvidia-smi", "conf-compute", "-f"),
             ("nvidia-smi", "conf-compute", "-grs"), ("journalctl", "-k", "-b", "0", "-o", "cat", "--no-pager")}


class StandInAgent:
    """Answers guest-exec / guest-exec-status as qemu-ga does, from a table of programs.

    A program the guest lacks fails at guest-exec, as g_spawn does in qemu-ga; libvirt
    raises that as an error, which LibvirtAgentChannel turns into AgentCommandError.
    """

    def __init__(self, programs: dict, polls_before_exit: int = 1, exec_disabled: bool = False,
                 hung: frozenset = frozenset()):
        self.programs = programs
        self.polls_before_exit = polls_before_exit
        self.exec_disabled = exec_disabled
        self.hung = hung  # programs that never exit
        self.ran: list[tuple[str, ...]] = []
        self.requests: list[dict] = []
        self._pids = itertools.count(4242)
        self._running: dict[int, list] = {}

    def command(self, request: str, timeout: int) -> str:
        message = json.loads(request)
        self.requests.append(message)
        assert timeout >= 1
        execute, arguments = message["execute"], message["arguments"]
        if execute == "guest-exec":
            if self.exec_disabled:
                raise AgentCommandError("unable to execute QEMU agent command 'guest-exec': "
                                        "The command guest-exec has been disabled for this instance")
            assert arguments["capture-output"] is True
            argv = (arguments["path"], *arguments["arg"])
            self.ran.append(argv)
            if not any(known[0] == argv[0] for known in self.programs):
                raise AgentCommandError(
                    "unable to execute QEMU agent command 'guest-exec': Guest agent command failed, "
                    f"error was 'Failed to execute child process \u201c{argv[0]}\u201d (No such file or directory)'")
            answer = self.programs.get(argv, (127, "", f"{argv[0]}: unexpected arguments\n"))
            pid = next(self._pids)
            self._running[pid] = [10**9 if argv in self.hung else self.polls_before_exit, answer]
            return json.dumps({"return": {"pid": pid}})
        if execute == "guest-exec-status":
            if arguments.get("pid") not in self._running:  # qemu-ga's words (qga/commands.c)
                raise AgentCommandError("unable to execute QEMU agent command 'guest-exec-status': "
                                        "Invalid parameter 'pid'")
            state = self._running[arguments["pid"]]
            if state[0] > 0:
                state[0] -= 1
                return json.dumps({"return": {"exited": False}})
            code, out, err = state[1]
            status = {"exited": True, "exitcode": code}
            if out:
                status["out-data"] = base64.b64encode(out.encode()).decode()
            if err:
                status["err-data"] = base64.b64encode(err.encode()).decode()
            return json.dumps({"return": status})
        raise AssertionError(f"verify sent an unexpected agent command {execute}")


class CorruptedReply:
    """A stand-in agent one of whose replies is replaced by what a broken or hostile agent
    may send: the ``nth`` request (counting from 0), or the ``nth`` one of ``execute``.
    The agent still acts on the request (a program runs, a file opens); only its answer
    is lost."""

    def __init__(self, agent, reply: str, nth: int = 0, execute: str | None = None):
        self.agent, self.reply, self.nth, self.execute = agent, reply, nth, execute
        self.seen = 0
        self.replaced: str | None = None  # the command whose reply was replaced

    def command(self, request: str, timeout: int) -> str:
        try:
            answer = self.agent.command(request, timeout)
        except AgentCommandError:
            answer = None
        if self.execute is None or json.loads(request)["execute"] == self.execute:
            self.seen += 1
            if self.seen == self.nth + 1:
                self.replaced = json.loads(request)["execute"]
                return self.reply
        if answer is None:
            return self.agent.command(request, timeout)  # the error again, as the agent gave it
        return answer


_KEYS = st.sampled_from(["return", "error", "desc", "class", "pid", "exited", "exitcode", "signal", "out-data",
                         "err-data", "out-truncated", "err-truncated", "count", "buf-b64", "eof"])
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS | st.text(max_size=6), inner,
                                                                                  max_size=4),
                     max_leaves=10)
# Replies of every kind: text that is not JSON, any JSON, and objects with the agent's own
# keys holding values of the wrong type (the likeliest malformed answers).
MALFORMED_REPLIES = st.one_of(
    st.text(max_size=30), _JSON.map(json.dumps),
    st.fixed_dictionaries({}, optional={"return": _JSON | st.dictionaries(_KEYS, _JSON, max_size=5),
                                        "error": _JSON | st.dictionaries(_KEYS, _JSON, max_size=3)}).map(json.dumps))


def _verify(programs: dict, **agent_options):
    agent = StandInAgent(programs, **agent_options)
    report = verify_guest(GuestExec(agent, timeout=5, poll=0.001), "td-1")
    assert set(agent.ran) <= READ_ONLY, agent.ran  # nothing in the guest is changed
    return report, agent


def _by_name(report) -> dict:
    return {check.name: check for check in report.checks}


def test_a_ready_td_passes_every_check():
    report, agent = _verify(tdx_guest())
    assert report.ok, report.as_dict()
    checks = _by_name(report)
    assert checks["TDX memory encryption"].detail == "Memory Encryption Features active: Intel TDX"
    assert checks["GPU CC mode"].detail == "CC status: ON"
    assert checks["GPU CC ready state"].detail == "ready state: ready"
    assert checks["NVIDIA driver loaded"].detail == "loaded: nvidia_uvm, nvidia"
    # Each program is polled through guest-exec-status until it exits.
    statuses = [r for r in agent.requests if r["execute"] == "guest-exec-status"]
    assert len(statuses) == 2 * len(agent.ran)
    assert "journalctl" not in {argv[0] for argv in agent.ran}  # dmesg had the line


def test_gpu_with_cc_off_fails_with_the_real_nvidia_smi_output():
    report, _ = _verify(tdx_guest({("nvidia-smi", "conf-compute", "-f"): (0, CC_OFF_F, ""),
                                      ("nvidia-smi", "conf-compute", "-grs"): (0, CC_OFF_GRS, "")}))
    assert not report.ok
    checks = _by_name(report)
    assert [c.name for c in report.failed] == ["GPU CC mode", "GPU CC ready state"]
    assert checks["GPU CC mode"].detail == "CC status: OFF"
    assert "--set-cc-mode on" in checks["GPU CC mode"].fix
    assert checks["GPU CC ready state"].detail == "ready state: not-ready (CC mode is off)"
    assert report.failure_message() == ("TD 'td-1' is not ready for its GPU: GPU CC mode, "
                                        "GPU CC ready state (see the fixes above)")


def test_cc_on_but_not_ready_says_to_set_the_ready_state():
    report, _ = _verify(tdx_guest({("nvidia-smi", "conf-compute", "-grs"): (0, CC_OFF_GRS, "")}))
    [failed] = report.failed
    assert failed.name == "GPU CC ready state"
    assert "nvidia-smi conf-compute -srs 1" in failed.fix


def test_a_plain_vm_without_the_driver_fails_each_check_with_its_reason():
    programs = tdx_guest({
        ("stat", "-c", "%F", "/dev/tdx_guest"): NO_TDX_DEVICE,
        ("dmesg",): (0, PLAIN_DMESG, ""),
        ("cat", "/proc/cmdline"): (0, PLAIN_CMDLINE, ""),
        ("cat", "/proc/crypto"): (0, _crypto("ecdsa-nist-p256"), ""),
        ("lsmod",): (0, LSMOD_PLAIN, ""),
        ("nvidia-smi", "conf-compute", "-f"): None,  # not installed
        ("nvidia-smi", "conf-compute", "-grs"): None,
        ("journalctl", "-k", "-b", "0", "-o", "cat", "--no-pager"): (0, PLAIN_DMESG, ""),
    })
    report, _ = _verify(programs)
    checks = _by_name(report)
    assert all(check.ok is False for check in report.checks), report.as_dict()
    assert "No such file or directory" in checks["TDX guest device"].detail
    assert "CONFIG_TDX_GUEST_DRIVER" in checks["TDX guest device"].fix
    assert checks["TDX memory encryption"].detail == "the kernel reported no memory encryption at boot"
    assert checks["kernel argument clearcpuid=mtrr"].detail.endswith("console=ttyS0")
    assert checks["SPDM crypto"].detail == "not registered: ecdsa-nist-p384, ecdh-nist-p384"
    assert checks["NVIDIA driver loaded"].detail == "no nvidia module in lsmod"
    assert "nvidia-smi did not run" in checks["GPU CC mode"].detail
    assert "No such file or directory" in checks["GPU CC mode"].detail


def test_nvidia_smi_without_a_device_reports_its_message():
    no_device = (6, "No devices were found\n", "")
    report, _ = _verify(tdx_guest({("nvidia-smi", "conf-compute", "-f"): no_device,
                                      ("nvidia-smi", "conf-compute", "-grs"): no_device}))
    assert _by_name(report)["GPU CC mode"].detail == "nvidia-smi conf-compute -f: No devices were found"


def test_wrapped_dmesg_falls_back_to_the_journal():
    late = "[86400.000001] virtio_net virtio1 enp1s0: renamed\n"
    report, agent = _verify(tdx_guest({
        ("dmesg",): (0, late, ""),
        ("journalctl", "-k", "-b", "0", "-o", "cat", "--no-pager"):
            (0, "tdx: Guest detected\nMemory Encryption Features active: Intel TDX\n", ""),
    }))
    assert report.ok
    assert ("journalctl", "-k", "-b", "0", "-o", "cat", "--no-pager") in agent.ran


def test_no_boot_log_at_all_is_unknown_not_a_verdict():
    report, _ = _verify(tdx_guest({("dmesg",): (1, "", "dmesg: read kernel buffer failed: Operation not permitted\n")}))
    check = _by_name(report)["TDX memory encryption"]
    assert check.ok is None and check.result == "unknown"
    assert not report.ok


def test_clearcpuid_in_a_list_counts():
    cmdline = PLAIN_CMDLINE.strip() + " clearcpuid=pku,mtrr\n"
    report, _ = _verify(tdx_guest({("cat", "/proc/cmdline"): (0, cmdline, "")}))
    assert _by_name(report)["kernel argument clearcpuid=mtrr"].ok


def test_amd_memory_encryption_is_not_tdx():
    dmesg = TDX_DMESG.replace("Intel TDX", "AMD SEV SEV-ES SEV-SNP")
    check = _by_name(_verify(tdx_guest({("dmesg",): (0, dmesg, "")}))[0])["TDX memory encryption"]
    assert check.ok is False and check.detail.endswith("AMD SEV SEV-ES SEV-SNP")


def test_agent_with_guest_exec_disabled_is_one_clear_error():
    with pytest.raises(GuestNotReadyError, match="refuses guest-exec"):
        _verify(tdx_guest(), exec_disabled=True)


def test_a_program_that_never_exits_times_out():
    agent = StandInAgent(tdx_guest(), polls_before_exit=10**9)
    with pytest.raises(GuestNotReadyError, match="did not finish within 0.05 s"):
        GuestExec(agent, timeout=0.05, poll=0.01).run(["dmesg"])


def test_agent_error_replies_become_agent_command_errors():
    class ErrorReplies:
        def command(self, request, timeout):
            return json.dumps({"error": {"class": "GenericError", "desc": "boom"}})

    with pytest.raises(AgentCommandError, match="boom"):
        GuestExec(ErrorReplies()).run(["lsmod"])


@pytest.mark.parametrize("execute, reply, words", [
    ("guest-exec", "not JSON at all", "answered guest-exec with text that is not JSON: \"not JSON at all\""),
    ("guest-exec", '{"error": "boom"}', "answered guest-exec with an error without a description: \"boom\""),
    ("guest-exec", '{"error": {"class": "GenericError"}}', "an error without a description"),
    ("guest-exec", "[1, 2]", "JSON that is not an object: [1, 2]"),
    ("guest-exec", '{"happy": true}', "neither a result nor an error"),
    ("guest-exec", '{"return": 4242}', "answered guest-exec with no process id: 4242"),
    ("guest-exec", '{"return": {"pid": true}}', "no process id"),
    ("guest-exec-status", '{"return": {"exited": 1}}', "answered guest-exec-status with no exited flag"),
    ("guest-exec-status", '{"return": "done"}', "no exited flag"),
    ("guest-exec-status", '{"return": {"exited": true, "exitcode": "0"}}', "'exitcode' not an integer: \"0\""),
    ("guest-exec-status", '{"return": {"exited": true, "exitcode": false}}', "'exitcode' not an integer: false"),
    ("guest-exec-status", '{"return": {"exited": true, "signal": 9.5}}', "'signal' not an integer"),
    ("guest-exec-status", '{"return": {"exited": true, "exitcode": 0, "out-data": "@@@@"}}',
     "'out-data' not base64: \"@@@@\""),
    ("guest-exec-status", '{"return": {"exited": true, "exitcode": 0, "err-data": 12}}',
     "'err-data' not a string: 12"),
    ("guest-exec-status", '{"return": {"exited": true, "exitcode": 0, "out-truncated": "no"}}',
     "'out-truncated' not true or false"),
])
def test_a_malformed_agent_reply_is_one_line_naming_it(execute, reply, words):
    agent = CorruptedReply(StandInAgent(tdx_guest()), reply, execute=execute)
    with pytest.raises(GuestNotReadyError) as error:
        verify_guest(GuestExec(agent, timeout=5, poll=0.001, name="TD 'td-1'"), "td-1")
    message = str(error.value)
    assert message.startswith("the guest agent in TD 'td-1' answered ") and words in message, message
    assert "\n" not in message and message.endswith("(restart qemu-guest-agent in the guest)")


def test_a_malformed_reply_is_shown_escaped_and_capped():
    hostile = json.dumps({"return": {"exited": True, "exitcode": "\x1b[2J\n" + "A" * 10_000}})
    with pytest.raises(GuestNotReadyError) as error:
        GuestExec(CorruptedReply(StandInAgent(tdx_guest()), hostile, execute="guest-exec-status"),
                  poll=0.001).run(["dmesg"])
    message = str(error.value)
    assert "\\u001b[2J\\n" in message and "\x1b" not in message and "\n" not in message
    assert "more characters cut" in message and len(message) < 600


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nth=st.integers(min_value=0, max_value=30), reply=MALFORMED_REPLIES)
def test_any_malformed_reply_gives_a_report_or_one_line_never_a_crash(nth, reply):
    agent = CorruptedReply(StandInAgent(tdx_guest()), reply, nth=nth)
    try:
        report = verify_guest(GuestExec(agent, timeout=5, poll=0.001), "td-1")
    except GuestNotReadyError as error:
        assert "\n" not in str(error)
    else:
        assert len(report.checks) == 7


def test_json_report_shape():
    data = _verify(tdx_guest({("lsmod",): (0, LSMOD_PLAIN, "")}))[0].as_dict()
    assert data["domain"] == "td-1" and data["ok"] is False
    assert [c["check"] for c in data["checks"]] == [
        "TDX guest device", "TDX memory encryption", "kernel argument clearcpuid=mtrr", "SPDM crypto",
        "NVIDIA driver loaded", "GPU CC mode", "GPU CC ready state"]
    assert {c["result"] for c in data["checks"]} == {"ok", "fail"}


# --- the domain side, on the real libvirt daemon (test driver) ------------------------------

def _define(conn, name: str, channel: bool, running: bool):
    devices = f"<devices>{AGENT_CHANNEL_XML}</devices>" if channel else ""
    domain = conn.defineXML(f"<domain type='test'><name>{name}</name><memory>524288</memory>"
                            f"<os><type>hvm</type></os>{devices}</domain>")
    if running:
        domain.create()
    return domain


def test_channel_is_found_in_the_domain_xml(conn, td_name):
    with_channel = _define(conn, td_name, channel=True, running=False)
    assert agent_channel_state(with_channel.XMLDesc(0)) == ""
    assert agent_channel_state("<domain><devices><channel type='unix'><target type='virtio' "
                               "name='org.qemu.guest_agent.0' state='disconnected'/></channel>"
                               "</devices></domain>") == "disconnected"
    assert agent_channel_state("<domain><devices/></domain>") is None


def test_a_guest_without_the_agent_channel_is_told_how_to_add_it(conn, td_name):
    _define(conn, td_name, channel=False, running=True)
    with pytest.raises(GuestNotReadyError) as error:
        verify_domain(conn, td_name)
    message = str(error.value)
    assert AGENT_CHANNEL_XML in message and "qemu-guest-agent" in message and "\n" not in message


def test_a_stopped_td_is_told_to_start(conn, td_name):
    _define(conn, td_name, channel=True, running=False)
    with pytest.raises(GuestNotReadyError, match=f"`tdxvirt start {td_name}`"):
        verify_domain(conn, td_name)


def test_a_driver_without_agent_support_is_named(conn, td_name, sim_uri):
    _define(conn, td_name, channel=True, running=True)
    with pytest.raises(LibvirtOperationError, match="cannot talk to guest agents") as error:
        verify_domain(conn, td_name)
    assert sim_uri in str(error.value)


def test_an_unknown_td_is_not_found(conn):
    with pytest.raises(NotFoundError):
        verify_domain(conn, "no-such-td-anywhere")


def test_cli_verify_one_line_errors(sim_uri, conn, td_name):
    from tdxvirt.cli import main
    from tdxvirt.cli.guest import guest

    if "guest" not in main.commands:  # until the lead wires it into tdxvirt.cli
        main.add_command(guest)
    _define(conn, td_name, channel=False, running=True)
    result = CliRunner().invoke(main, ["-c", sim_uri, "guest", "verify", td_name, "--json"])
    assert result.exit_code == 1
    assert result.stderr.startswith("tdxvirt: error: TD ") and result.stderr.count("\n") == 1
    assert "org.qemu.guest_agent.0" in result.stderr
    missing = CliRunner().invoke(main, ["-c", sim_uri, "guest", "verify", "no-such-td-anywhere"])
    assert missing.exit_code == 2 and "no domain named" in missing.stderr


NVIDIA_QUERY = ("nvidia-smi", "--query-gpu=driver_version,vbios_version", "--format=csv,noheader")


@pytest.mark.parametrize("answer, driver, vbios", [
    # nvidia-smi's CSV without header: one line per GPU, ", " between the fields
    ((0, "580.95.05, 96.00.99.00.01\n", ""), "580.95.05", "96.00.99.00.01"),
    ((0, "580.95.05, 96.00.99.00.01\n580.95.05, 96.00.99.00.02\n", ""), "580.95.05",
     "96.00.99.00.01, 96.00.99.00.02"),
    ((0, "", ""), "unknown: nvidia-smi listed no GPU", "unknown"),
    ((9, "", "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n"),
     "unknown: nvidia-smi: NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA "
     "driver.", "unknown"),
    # a hostile guest: escapes, a third field, an endless word are not versions
    ((0, "580.95.05\x1b[2J, 96.00\n", ""), "unknown: nvidia-smi's answer is not a version list", "unknown"),
    ((0, "1, 2, 3\n", ""), "unknown: nvidia-smi's answer is not a version list", "unknown"),
    ((0, "5" * 100 + ", 96\n", ""), "unknown: nvidia-smi's answer is not a version list", "unknown"),
])
def test_the_guests_nvidia_driver_and_vbios_versions_are_read_as_versions_only(answer, driver, vbios):
    from tdxvirt.guest.verify import nvidia_versions

    agent = StandInAgent({NVIDIA_QUERY: answer})
    versions = nvidia_versions(GuestExec(agent, timeout=5, poll=0.001))
    assert versions == {"driver": driver, "vbios": vbios}
    assert agent.ran == [NVIDIA_QUERY]  # one read-only query


def test_a_guest_without_nvidia_smi_gives_unknown_versions_saying_why():
    from tdxvirt.guest.verify import nvidia_versions

    versions = nvidia_versions(GuestExec(StandInAgent({("lsmod",): (0, "", "")}), timeout=5, poll=0.001))
    assert versions["driver"].startswith("unknown: nvidia-smi: ") and "nvidia-smi" in versions["driver"][20:]
    assert versions["vbios"] == "unknown"
