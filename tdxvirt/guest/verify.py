"""``guest verify``: read-only checks run inside a running TD through the QEMU guest agent.

The host asks the guest agent (virtio-serial channel ``org.qemu.guest_agent.0``) to run
a few read-only commands with ``guest-exec`` and collects their output with
``guest-exec-status``, both sent through libvirt-qemu's ``qemuAgentCommand``. What is
checked, and why (the usual reasons ``nvidia-smi`` finds no GPU in a TD):

- TDX is active: ``/dev/tdx_guest`` exists, and the kernel logged
  "Memory Encryption Features active: Intel TDX";
- the kernel command line has ``clearcpuid=mtrr``;
- the SPDM crypto the GPU session needs is registered (``/proc/crypto``);
- the ``nvidia`` module is loaded (``lsmod``);
- ``nvidia-smi conf-compute -f`` says ``CC status: ON`` and ``-grs`` says ``ready``.

The agent sits behind ``AgentChannel`` (one JSON request in, one JSON reply out) so
tests can answer for a guest that does not exist here.

Everything here is the guest's own account: its agent runs the programs and returns
their output, and a compromised or hostile guest can say anything. So each value taken
from the guest is capped (textsafe.GUEST_TEXT_LIMIT characters) before it reaches a
report, the CLI escapes it, and results are worded as what the guest reported: only
attestation (a TD quote checked against its measurements) verifies a TD.
"""

from __future__ import annotations

import base64
import json
import re
import time
from dataclasses import dataclass, field
from typing import Protocol

from ..domain.domainxml import AGENT_CHANNEL_NAME
from ..errors import LibvirtOperationError
from ..textsafe import guest_text
from . import GuestNotReadyError

AGENT_CHANNEL_XML = f"<channel type='unix'><target type='virtio' name='{AGENT_CHANNEL_NAME}'/></channel>"
TDX_LINE = "Memory Encryption Features active:"
# The algorithms NVIDIA's driver asks the kernel for during the GPU's SPDM session.
SPDM_ALGORITHMS = ("ecdsa-nist-p384", "ecdh-nist-p384")
DEFAULT_TIMEOUT = 30.0


class AgentCommandError(Exception):
    """The guest agent answered a command with an error (e.g. the program does not exist)."""


class AgentChannel(Protocol):
    def command(self, request: str, timeout: int) -> str:
        """Send one guest-agent JSON command; return the agent's JSON reply."""


def missing_agent_message(name: str) -> str:
    return (
        f"TD {name!r} has no QEMU guest agent channel; add {AGENT_CHANNEL_XML} under <devices> "
        f"(`virsh edit {name}`) and install qemu-guest-agent in the guest, then restart the TD"
    )


def silent_agent_message(name: str) -> str:
    return (
        f"no QEMU guest agent answers in TD {name!r}; for a guest still booting, `tdxvirt "
        f"guest verify {name} --wait 120` waits for it; else install and start it in the guest (`apt install "
        "qemu-guest-agent`, `systemctl start qemu-guest-agent`; tdxvirt's --cloud-init first "
        "boot does both)"
    )


class LibvirtAgentChannel:
    """The real channel: libvirt-qemu's qemuAgentCommand on a running domain."""

    def __init__(self, domain, uri: str = ""):
        self.domain = domain
        self.uri = uri

    def command(self, request: str, timeout: int) -> str:
        import libvirt
        import libvirt_qemu

        from ..virt.conn import message, translate

        try:
            return libvirt_qemu.qemuAgentCommand(self.domain, request, timeout, 0)
        except libvirt.libvirtError as error:
            code, name = error.get_error_code(), self.domain.name()
            if code == libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED:  # "QEMU guest agent is not configured"
                raise GuestNotReadyError(missing_agent_message(name)) from None
            if code == libvirt.VIR_ERR_AGENT_UNRESPONSIVE:
                raise GuestNotReadyError(silent_agent_message(name)) from None
            if code == libvirt.VIR_ERR_OPERATION_INVALID:  # "domain is not running"
                raise GuestNotReadyError(f"TD {name!r} is not running: {message(error)}") from None
            if code == libvirt.VIR_ERR_NO_SUPPORT:
                raise LibvirtOperationError(
                    f"the libvirt driver at {self.uri or 'this URI'} cannot talk to guest agents "
                    f"({message(error)}); verify needs the qemu driver (qemu:///system)"
                ) from None
            if "agent command" in message(error):  # the agent itself refused the command
                raise AgentCommandError(message(error)) from None
            raise translate(error, f"guest agent command in {name!r} failed") from None


@dataclass(frozen=True)
class ExecResult:
    argv: tuple[str, ...]
    exitcode: int | None
    stdout: str
    stderr: str
    signal: int | None = None
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exitcode == 0

    def first_line(self) -> str:
        """The first non-empty line of its output (guest text, capped)."""
        for text in (self.stderr, self.stdout):
            for line in text.splitlines():
                if line.strip():
                    return guest_text(line.strip())
        return f"exit code {self.exitcode}"


def _shown(value) -> str:
    """A reply as one capped line: JSON escapes every control character and line break."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError, RecursionError):
        text = ascii(value)
    return guest_text(text)


def _is_int(value) -> bool:
    return type(value) is int  # JSON true/false are bools in Python, and 1.0 is no pid


class GuestExec:
    """Runs a program in the guest and waits for it (guest-exec, then guest-exec-status).

    Every reply is checked against the shape qemu-ga gives it (qga/qapi-schema.json:
    GuestExec, GuestExecStatus, GuestFileRead, GuestFileWrite): a guest controls its
    agent, so a reply of another shape is a one-line GuestNotReadyError, never a crash.
    """

    def __init__(self, channel: AgentChannel, timeout: float = DEFAULT_TIMEOUT, poll: float = 0.1,
                 name: str = "the guest"):
        self.channel = channel
        self.timeout = timeout
        self.poll = poll
        self.name = name

    def malformed(self, execute: str, what: str, value) -> GuestNotReadyError:
        """The agent answered ``execute`` with something no qemu-ga sends."""
        return GuestNotReadyError(
            f"the guest agent in {self.name} answered {execute} with {what}: {_shown(value)}; "
            "it does not speak the QEMU guest agent protocol (restart qemu-guest-agent in the guest)")

    def call(self, execute: str, arguments: dict):
        """The agent's "return" value for one command; AgentCommandError for its
        {"error": {"class", "desc"}} reply."""
        request = json.dumps({"execute": execute, "arguments": arguments})
        text = self.channel.command(request, max(1, int(self.timeout)))
        try:
            reply = json.loads(text)
        except (TypeError, ValueError, RecursionError):  # ValueError covers JSONDecodeError
            raise self.malformed(execute, "text that is not JSON", text) from None
        if not isinstance(reply, dict):
            raise self.malformed(execute, "JSON that is not an object", reply)
        if "error" in reply:
            error = reply["error"]
            desc = error.get("desc") if isinstance(error, dict) else None
            if not isinstance(desc, str):
                raise self.malformed(execute, "an error without a description", error)
            raise AgentCommandError(desc)
        if "return" not in reply:
            raise self.malformed(execute, "neither a result nor an error", reply)
        return reply["return"]

    def decode(self, execute: str, key: str, data) -> bytes:
        """A base64 field of a reply (qemu-ga's g_base64_encode: standard alphabet, padded)."""
        if not isinstance(data, str):
            raise self.malformed(execute, f"{key!r} not a string", data)
        try:
            return base64.b64decode(data, validate=True)
        except ValueError:  # binascii.Error is a ValueError
            raise self.malformed(execute, f"{key!r} not base64", data) from None

    def _text(self, status: dict, key: str) -> str:
        if key not in status:
            return ""
        return self.decode("guest-exec-status", key, status[key]).decode("utf-8", errors="replace")

    def _result(self, argv: tuple[str, ...], status: dict) -> ExecResult:
        """A finished program's GuestExecStatus: exitcode, or signal, optional (qemu-ga
        gives one of them); out-data/err-data base64, *-truncated bools, each optional."""
        for key in ("exitcode", "signal"):
            if key in status and not _is_int(status[key]):
                raise self.malformed("guest-exec-status", f"{key!r} not an integer", status[key])
        for key in ("out-truncated", "err-truncated"):
            if key in status and not isinstance(status[key], bool):
                raise self.malformed("guest-exec-status", f"{key!r} not true or false", status[key])
        return ExecResult(argv=argv, exitcode=status.get("exitcode"), signal=status.get("signal"),
                          stdout=self._text(status, "out-data"), stderr=self._text(status, "err-data"),
                          truncated=bool(status.get("out-truncated") or status.get("err-truncated")))

    def run(self, argv: list[str] | tuple[str, ...]) -> ExecResult:
        argv = tuple(argv)
        try:
            started = self.call("guest-exec", {"path": argv[0], "arg": list(argv[1:]),
                                               "capture-output": True})
        except AgentCommandError as error:
            if "disabled" in str(error).lower():
                raise GuestNotReadyError(
                    f"the guest agent in {self.name} refuses guest-exec ({guest_text(str(error))}); allow "
                    "guest-exec and guest-exec-status in its configuration (e.g. --allow-rpcs)"
                ) from None
            raise
        if not isinstance(started, dict) or not _is_int(started.get("pid")):
            raise self.malformed("guest-exec", "no process id", started)
        deadline = time.monotonic() + self.timeout
        delay = self.poll
        while True:
            status = self.call("guest-exec-status", {"pid": started["pid"]})
            if not isinstance(status, dict) or not isinstance(status.get("exited"), bool):
                raise self.malformed("guest-exec-status", "no exited flag", status)
            if status["exited"]:
                return self._result(argv, status)
            if time.monotonic() >= deadline:
                raise GuestNotReadyError(
                    f"{' '.join(argv)} did not finish within {self.timeout:g} s in {self.name}; "
                    "is the guest overloaded or hung?"
                )
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


@dataclass(frozen=True)
class GuestCheck:
    name: str
    ok: bool | None  # None: could not tell
    detail: str
    fix: str = ""

    @property
    def result(self) -> str:
        return {True: "ok", False: "FAIL", None: "unknown"}[self.ok]

    def as_dict(self) -> dict:
        return {"check": self.name, "ok": self.ok, "result": self.result.lower(),
                "detail": self.detail, "fix": self.fix}


@dataclass(frozen=True)
class VerifyReport:
    domain: str
    checks: tuple[GuestCheck, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return all(check.ok is True for check in self.checks)

    @property
    def failed(self) -> list[GuestCheck]:
        return [check for check in self.checks if check.ok is not True]

    def as_dict(self) -> dict:
        return {"domain": self.domain, "ok": self.ok, "checks": [c.as_dict() for c in self.checks]}

    def failure_message(self) -> str:
        names = ", ".join(check.name for check in self.failed)
        return f"TD {self.domain!r} is not ready for its GPU: {names} (see the fixes above)"


def _reason(agent_error: str) -> str:
    """qemu-ga's own words from libvirt's wrapping ("... error was 'Failed to execute ...'")."""
    match = re.search(r"error was '(.*)'\s*$", agent_error)
    return guest_text(match.group(1) if match else agent_error)


def _run(guest: GuestExec, argv) -> ExecResult | str:
    """The result, or why the agent could not even start the program (e.g. not installed)."""
    try:
        return guest.run(argv)
    except AgentCommandError as error:
        return _reason(str(error))


# --- the checks: each runs read-only programs and reads their output -----------------

def check_tdx_device(guest: GuestExec) -> GuestCheck:
    name = "TDX guest device"
    result = _run(guest, ["stat", "-c", "%F", "/dev/tdx_guest"])
    if isinstance(result, ExecResult) and result.ok and "character" in result.stdout:
        return GuestCheck(name, True, "/dev/tdx_guest is present")
    why = result if isinstance(result, str) else result.first_line()
    return GuestCheck(name, False, f"no /dev/tdx_guest ({why})",
                      "the guest kernel needs CONFIG_INTEL_TDX_GUEST and CONFIG_TDX_GUEST_DRIVER "
                      "(`tdxvirt guest check-config`), and the domain must be a TD")


def _tdx_line(text: str) -> str | None:
    for line in text.splitlines():
        if TDX_LINE in line:
            return guest_text(line[line.index(TDX_LINE):].strip())
    return None


def check_tdx_active(guest: GuestExec) -> GuestCheck:
    name = "TDX memory encryption"
    fix = "start the domain as a TD (<launchSecurity type='tdx'>) with a kernel that has CONFIG_INTEL_TDX_GUEST"
    dmesg = _run(guest, ["dmesg"])
    line = _tdx_line(dmesg.stdout) if isinstance(dmesg, ExecResult) and dmesg.ok else None
    covers_boot = (isinstance(dmesg, ExecResult) and dmesg.ok
                   and re.match(r"^\[\s*0\.0+\]", dmesg.stdout.lstrip()) is not None)
    if line is None:  # the ring buffer may have wrapped, or dmesg is restricted: ask the journal
        journal = _run(guest, ["journalctl", "-k", "-b", "0", "-o", "cat", "--no-pager"])
        if isinstance(journal, ExecResult) and journal.ok:
            line = _tdx_line(journal.stdout)
            covers_boot = covers_boot or bool(journal.stdout.strip())
    if line is None:
        if covers_boot:
            return GuestCheck(name, False, "the kernel reported no memory encryption at boot", fix)
        return GuestCheck(name, None, "no kernel log from boot time to read (dmesg wrapped, no journal)",
                          "look for 'Memory Encryption Features active: Intel TDX' in the guest's boot log")
    if "Intel TDX" in line:
        return GuestCheck(name, True, line)
    return GuestCheck(name, False, line, fix)


def check_cmdline(guest: GuestExec) -> GuestCheck:
    name = "kernel argument clearcpuid=mtrr"
    fix = ("add clearcpuid=mtrr to GRUB_CMDLINE_LINUX_DEFAULT in the guest, run update-grub and "
           "reboot (tdxvirt's --cloud-init first boot does this)")
    result = _run(guest, ["cat", "/proc/cmdline"])
    if isinstance(result, str) or not result.ok:
        return GuestCheck(name, None, f"cannot read /proc/cmdline: "
                          f"{result if isinstance(result, str) else result.first_line()}", fix)
    cleared = [value for token in result.stdout.split() if token.startswith("clearcpuid=")
               for value in token.split("=", 1)[1].split(",")]
    if "mtrr" in cleared:
        return GuestCheck(name, True, "/proc/cmdline has clearcpuid=mtrr")
    return GuestCheck(name, False, f"/proc/cmdline lacks it: {guest_text(result.stdout.strip())}", fix)


def check_spdm_crypto(guest: GuestExec) -> GuestCheck:
    name = "SPDM crypto"
    fix = ("load ecdsa_generic and ecdh_generic before nvidia (modules-load.d + a modprobe.d "
           "softdep; tdxvirt's --cloud-init does this), or build them in")
    result = _run(guest, ["cat", "/proc/crypto"])
    if isinstance(result, str) or not result.ok:
        return GuestCheck(name, None, "cannot read /proc/crypto", fix)
    registered = set(re.findall(r"^name\s*:\s*(\S+)", result.stdout, flags=re.M))
    missing = [alg for alg in SPDM_ALGORITHMS if alg not in registered]
    if not missing:
        return GuestCheck(name, True, f"{', '.join(SPDM_ALGORITHMS)} registered")
    return GuestCheck(name, False, f"not registered: {', '.join(missing)}", fix)


def check_nvidia_loaded(guest: GuestExec) -> GuestCheck:
    name = "NVIDIA driver loaded"
    fix = ("install NVIDIA's open kernel modules in the guest and load them (`modprobe nvidia`); "
           "look for NVRM lines in dmesg")
    result = _run(guest, ["lsmod"])
    if isinstance(result, str) or not result.ok:
        return GuestCheck(name, None, f"lsmod failed: "
                          f"{result if isinstance(result, str) else result.first_line()}", fix)
    modules = [line.split()[0] for line in result.stdout.splitlines()[1:] if line.strip()]
    nvidia = [module for module in modules if module == "nvidia" or module.startswith("nvidia_")]
    if "nvidia" in nvidia:
        return GuestCheck(name, True, "loaded: " + guest_text(", ".join(nvidia)))
    return GuestCheck(name, False, "no nvidia module in lsmod", fix)


def _nvidia_smi(guest: GuestExec, flag: str, pattern: str) -> tuple[str | None, str]:
    """(value matched in nvidia-smi's output, or None; what went wrong)."""
    result = _run(guest, ["nvidia-smi", "conf-compute", flag])
    if isinstance(result, str):
        return None, f"nvidia-smi did not run: {result}"
    match = re.search(pattern, result.stdout, flags=re.M)
    if result.ok and match:
        return guest_text(match.group(1)), ""
    return None, f"nvidia-smi conf-compute {flag}: {result.first_line()}"


# A driver version ("580.95.05") or a VBIOS version ("96.00.99.00.01"): anything else a
# guest answers is not taken as one (guests are hostile; the report shows only these).
_VERSION_WORD = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,39}$")


def nvidia_versions(guest: GuestExec) -> dict[str, str]:
    """The NVIDIA driver and each GPU's VBIOS version, as the guest's nvidia-smi reports
    them (the host's NVIDIA tool has no VBIOS query; with the GPU passed through, the
    guest's driver is the one that runs it). Keys: driver, vbios (one per GPU, comma
    separated); a value the guest could not give says why."""
    result = _run(guest, ["nvidia-smi", "--query-gpu=driver_version,vbios_version",
                          "--format=csv,noheader"])
    if isinstance(result, str) or not result.ok:
        why = result if isinstance(result, str) else result.first_line()
        return {"driver": f"unknown: nvidia-smi: {guest_text(why)}", "vbios": "unknown"}
    drivers, vbioses = [], []
    for line in result.stdout.splitlines()[:16]:
        cells = [cell.strip() for cell in line.split(",")]
        if len(cells) != 2 or not all(_VERSION_WORD.match(cell) for cell in cells):
            return {"driver": "unknown: nvidia-smi's answer is not a version list", "vbios": "unknown"}
        drivers.append(cells[0])
        vbioses.append(cells[1])
    if not drivers:
        return {"driver": "unknown: nvidia-smi listed no GPU", "vbios": "unknown"}
    return {"driver": ", ".join(dict.fromkeys(drivers)), "vbios": ", ".join(vbioses)}


CC_OFF_FIX = ("turn CC mode on for the GPU on the host with the GPU bound to vfio-pci "
              "(nvidia_gpu_tools --gpu-bdf BDF --set-cc-mode on --reset-after-cc-mode-switch), "
              "then restart the TD")


def check_cc_status(guest: GuestExec) -> GuestCheck:
    name = "GPU CC mode"
    value, problem = _nvidia_smi(guest, "-f", r"^CC status:\s*(\S+)")
    if value is None:
        return GuestCheck(name, False, problem, "install NVIDIA's driver in the guest; then: " + CC_OFF_FIX)
    if value.upper() == "ON":
        return GuestCheck(name, True, f"CC status: {value}")
    return GuestCheck(name, False, f"CC status: {value}", CC_OFF_FIX)


def check_ready_state(guest: GuestExec, cc_on: bool | None) -> GuestCheck:
    name = "GPU CC ready state"
    value, problem = _nvidia_smi(guest, "-grs", r"Ready state:\s*(\S+)")
    if value is None:
        return GuestCheck(name, False, problem, "install NVIDIA's driver in the guest")
    if value.lower() == "ready":
        return GuestCheck(name, True, f"ready state: {value}")
    if cc_on is False:
        return GuestCheck(name, False, f"ready state: {value} (CC mode is off)", CC_OFF_FIX)
    return GuestCheck(name, False, f"ready state: {value}",
                      "run `nvidia-smi conf-compute -srs 1` in the guest after the driver loads "
                      "(tdxvirt's --cloud-init enables tdxvirt-nvidia-cc-ready.service for it)")


def verify_guest(guest: GuestExec, name: str) -> VerifyReport:
    """Every check, in the order a broken setup fails them."""
    checks = [check_tdx_device(guest), check_tdx_active(guest), check_cmdline(guest),
              check_spdm_crypto(guest), check_nvidia_loaded(guest)]
    cc = check_cc_status(guest)
    checks += [cc, check_ready_state(guest, cc.ok)]
    return VerifyReport(domain=name, checks=tuple(checks))


# --- the domain side --------------------------------------------------------------------

def agent_channel_state(domain_xml: str) -> str | None:
    """None without a guest-agent channel; else its live state ('connected', 'disconnected', '')."""
    from ..domain.domainxml import DomainXML
    from ..textsafe import xml_parsable

    target = DomainXML.of(xml_parsable(domain_xml)).agent_channel()
    return None if target is None else target.get("state", "")


def verify_domain(conn, name: str, timeout: float = DEFAULT_TIMEOUT,
                  wait: float = 0) -> VerifyReport:
    """``wait``: seconds a booting guest's agent has to connect (libvirt marks the
    channel connected once qemu-ga opens its port), polled twice a second."""
    import time

    from ..virt.lookup import lookup

    domain = lookup(conn, name)
    name = domain.name()  # the resolved name (lookup refuses an ambiguous argument)
    deadline = time.monotonic() + wait
    while True:
        if not domain.isActive():
            raise GuestNotReadyError(f"TD {name!r} is not running; start it (`tdxvirt start "
                                     f"{name}`), let it boot, then verify again")
        state = agent_channel_state(domain.XMLDesc(0))
        if state != "disconnected" or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if state is None:
        raise GuestNotReadyError(missing_agent_message(name))
    if state == "disconnected":
        raise GuestNotReadyError(silent_agent_message(name))
    channel = LibvirtAgentChannel(domain, uri=conn.getURI())
    return verify_guest(GuestExec(channel, timeout=timeout, name=f"TD {name!r}"), name)
