"""The evidence a running TD hands over through its QEMU guest agent.

The TD quote comes from the guest kernel's configfs-tsm interface (Linux >= 6.7,
CONFIG_TSM_REPORTS with the tdx_guest provider; Documentation/ABI/testing/configfs-tsm):
a new directory below ``/sys/kernel/config/tsm/report`` is one request; writing
``inblob`` sets the TD report's 64-byte REPORTDATA, reading ``outblob`` asks the
TDX module for a TD report and the host's quote service (QGS) to turn it into a quote;
``provider`` names the backend (``tdx_guest``) and ``generation`` counts writes, so a
reader that sees 1 after its single write knows no one else changed the request.
The directory is removed afterwards.

REPORTDATA is the nonce itself, zero-padded to 64 bytes (checks.report_data_for),
not a hash of it: a verifier that wants a hash, a public key or a key's hash bound to
the quote passes that 64-byte value as the nonce, and the quote shows it verbatim.

Binary data moves with the agent's file commands (guest-file-open/-write/-read/-close,
base64 both ways); the directory is made and removed with mkdir/rmdir through
guest-exec (verify.GuestExec). Also collected:
- the CC event log, the ACPI CCEL table's data (``/sys/firmware/acpi/tables/data/CCEL``),
  when the firmware published one; it is returned, not replayed;
- NVIDIA's view where its tools are installed: ``nvidia-smi conf-compute -f`` (CC mode as
  the driver sees it) and NVIDIA's attestation CLI ``nvattest attest --device gpu
  --verifier local`` (its JSON ``result_code``/``result_message``). Both run in the guest
  and are the guest's account, not verified here.

Every value from the guest is capped (textsafe.guest_text) before it reaches a message.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from dataclasses import dataclass

from ..guest import GuestNotReadyError
from ..guest.verify import AgentCommandError, GuestExec
from ..textsafe import guest_text
from .checks import report_data_for

TSM_REPORTS = "/sys/kernel/config/tsm/report"
CCEL_DATA = "/sys/firmware/acpi/tables/data/CCEL"
TDX_PROVIDER = "tdx_guest"
QUOTE_LIMIT = 64 * 1024  # a TDX quote is about 5 KiB; more is not a quote
EVENT_LOG_LIMIT = 8 * 1024 * 1024
READ_CHUNK = 64 * 1024
NVATTEST = ("nvattest", "attest", "--device", "gpu", "--verifier", "local")
CC_STATUS = ("nvidia-smi", "conf-compute", "-f")


class GuestFiles:
    """The agent's file commands: whole files in and out, base64 on the wire."""

    def __init__(self, guest: GuestExec):
        self.guest = guest

    def _call(self, execute: str, arguments: dict) -> dict:
        request = json.dumps({"execute": execute, "arguments": arguments})
        reply = json.loads(self.guest.channel.command(request, max(1, int(self.guest.timeout))))
        if "error" in reply:
            raise AgentCommandError(reply["error"].get("desc", str(reply["error"])))
        return reply["return"]

    def read(self, path: str, limit: int) -> bytes:
        handle = self._call("guest-file-open", {"path": path, "mode": "r"})
        try:
            data = bytearray()
            while True:
                chunk = self._call("guest-file-read", {"handle": handle, "count": READ_CHUNK})
                data += base64.b64decode(chunk.get("buf-b64", ""))
                if len(data) > limit:
                    raise GuestNotReadyError(f"{path} in {self.guest.name} is larger than {limit} bytes; "
                                             "that is not what the kernel returns there")
                if chunk.get("eof") or not chunk.get("count"):
                    return bytes(data)
        finally:
            self._close(handle)

    def write(self, path: str, data: bytes) -> None:
        handle = self._call("guest-file-open", {"path": path, "mode": "w"})
        try:
            written = self._call("guest-file-write", {"handle": handle,
                                                      "buf-b64": base64.b64encode(data).decode()})
            if written.get("count") != len(data):
                raise GuestNotReadyError(f"the guest agent in {self.guest.name} wrote {written.get('count')} "
                                         f"of {len(data)} bytes to {path}")
        finally:
            self._close(handle)

    def _close(self, handle) -> None:
        try:
            self._call("guest-file-close", {"handle": handle})
        except AgentCommandError:
            pass  # the file's content was already read or written; a close error changes nothing


@dataclass(frozen=True)
class GpuEvidence:
    cc_status: str | None  # "ON", "OFF", ... as nvidia-smi prints it; None: not known
    cc_note: str
    verifier: bool | None  # NVIDIA's verifier in the guest: passed, failed, or not run
    verifier_note: str

    def as_dict(self) -> dict:
        return {"cc_status": self.cc_status, "cc_note": self.cc_note,
                "verifier_passed": self.verifier, "verifier_note": self.verifier_note}


@dataclass(frozen=True)
class Evidence:
    provider: str
    quote: bytes
    generation: int | None
    event_log: bytes | None
    event_log_note: str
    gpu: GpuEvidence

    def as_dict(self) -> dict:
        return {"provider": self.provider, "quote_bytes": len(self.quote),
                "quote_base64": base64.b64encode(self.quote).decode(), "generation": self.generation,
                "event_log_bytes": None if self.event_log is None else len(self.event_log),
                "event_log_note": self.event_log_note, "gpu": self.gpu.as_dict()}


def _reason(error: Exception) -> str:
    """qemu-ga's own words out of libvirt's wrapping: "unable to execute QEMU agent
    command 'guest-file-open': failed to open file ..." or, for guest-exec, "... Guest
    agent command failed, error was 'Failed to execute child process ...'"."""
    text = str(error)
    exec_marker = "error was '"
    if exec_marker in text:
        text = text[text.index(exec_marker) + len(exec_marker):].removesuffix("'")
    else:
        text = re.sub(r"^.*?unable to execute QEMU agent command '[\w-]+': ", "", text)
    return guest_text(text)


def _run(guest: GuestExec, argv) -> tuple[bool, str]:
    """(succeeded, its stdout or why it failed)."""
    try:
        result = guest.run(argv)
    except AgentCommandError as error:
        return False, _reason(error)
    return (True, result.stdout) if result.ok else (False, result.first_line())


def _no_quote_interface(guest: GuestExec, why: str) -> GuestNotReadyError:
    """Why the guest offers no configfs-tsm reports: not a TD, or configfs not mounted,
    or a kernel without CONFIG_TSM_REPORTS."""
    name = guest.name
    is_td, _ = _run(guest, ["stat", "-c", "%F", "/dev/tdx_guest"])
    if not is_td:
        return GuestNotReadyError(
            f"{name} cannot produce a TD quote: it has no {TSM_REPORTS} ({why}) and no /dev/tdx_guest, so it "
            "is not running as an Intel TDX TD (or its kernel lacks CONFIG_TDX_GUEST_DRIVER); start it as a TD")
    mounted, mounts = _run(guest, ["cat", "/proc/mounts"])
    if mounted and not any(line.split()[1:3] == ["/sys/kernel/config", "configfs"]
                           for line in mounts.splitlines() if len(line.split()) > 2):
        return GuestNotReadyError(f"{name} is a TD but configfs is not mounted; mount it in the guest "
                                  "(`mount -t configfs none /sys/kernel/config`) and attest again")
    return GuestNotReadyError(f"{name} is a TD but its kernel offers no configfs-tsm reports ({why}); "
                              "it needs CONFIG_TSM_REPORTS (Linux >= 6.7) with the tdx_guest driver loaded")


def _text(files: GuestFiles, path: str) -> str:
    return guest_text(files.read(path, 4096).decode("utf-8", errors="replace").strip())


def fetch_quote(guest: GuestExec, nonce: bytes) -> tuple[str, bytes, int | None]:
    """(provider, quote, generation) from configfs-tsm, REPORTDATA set from ``nonce``."""
    present, why = _run(guest, ["stat", "-c", "%F", TSM_REPORTS])
    if not present:
        raise _no_quote_interface(guest, why)
    report = f"{TSM_REPORTS}/tdxvirt-{secrets.token_hex(8)}"
    made, why = _run(guest, ["mkdir", report])
    if not made:
        raise GuestNotReadyError(f"cannot create a report request {report} in {guest.name}: {why}; "
                                 "the guest agent must run as root")
    files = GuestFiles(guest)
    try:
        provider = _text(files, f"{report}/provider")
        if provider != TDX_PROVIDER:
            raise GuestNotReadyError(f"{guest.name}'s attestation provider is {provider!r}, not {TDX_PROVIDER}: "
                                     "it is not an Intel TDX TD")
        files.write(f"{report}/inblob", report_data_for(nonce))
        try:
            quote = files.read(f"{report}/outblob", QUOTE_LIMIT)
        except AgentCommandError as error:
            raise GuestNotReadyError(
                f"{guest.name} could not get a quote ({_reason(error)}); the host's quote generation service "
                "must run and the TD must name it (<quoteGenerationService> in its launch security)") from None
        generation_text = _text(files, f"{report}/generation")
    except AgentCommandError as error:
        why = _reason(error)
        fix = ("; allow guest-file-open, -read, -write and -close in the agent's configuration "
               "(e.g. --allow-rpcs)") if "disabled" in why.lower() else ""
        raise GuestNotReadyError(f"reading {report} in {guest.name} failed: {why}{fix}") from None
    finally:
        _run(guest, ["rmdir", report])  # best effort: a leftover directory holds no secret
    generation = int(generation_text) if generation_text.isdigit() else None
    if generation is not None and generation != 1:
        raise GuestNotReadyError(f"another writer changed the report request in {guest.name} while tdxvirt "
                                 f"used it (generation {generation}, expected 1); attest again")
    if not quote:
        raise GuestNotReadyError(f"{guest.name} returned an empty quote; the host's quote generation service "
                                 "may have failed (see its log)")
    return provider, quote, generation


def fetch_event_log(guest: GuestExec) -> tuple[bytes | None, str]:
    try:
        data = GuestFiles(guest).read(CCEL_DATA, EVENT_LOG_LIMIT)
    except AgentCommandError as error:
        return None, f"no CC event log: {CCEL_DATA} cannot be read ({_reason(error)})"
    return data, f"{len(data)} bytes from {CCEL_DATA}"


def fetch_gpu(guest: GuestExec, gpus: int | None) -> GpuEvidence:
    if gpus == 0:
        none = "the TD has no GPU passed through"
        return GpuEvidence(None, none, None, none)
    try:
        smi = guest.run(list(CC_STATUS))
    except AgentCommandError as error:
        status, cc_note = None, f"nvidia-smi did not run in the guest: {_reason(error)}"
    else:
        status = next((line.split(":", 1)[1].strip() for line in smi.stdout.splitlines()
                       if line.strip().startswith("CC status:")), None) if smi.ok else None
        cc_note = (f"nvidia-smi in the guest: CC status: {guest_text(status)}" if status
                   else f"nvidia-smi conf-compute -f in the guest gave no CC status: {smi.first_line()}")
    try:
        result = guest.run(list(NVATTEST))
    except AgentCommandError as error:
        return GpuEvidence(guest_text(status) if status else None, cc_note, None,
                           f"NVIDIA's attestation CLI (nvattest) did not run in the guest: {_reason(error)}")
    try:
        answer = json.loads(result.stdout)
    except ValueError:
        answer = {}
    code = answer.get("result_code") if isinstance(answer, dict) else None
    message = guest_text(str(answer.get("result_message", ""))) if isinstance(answer, dict) else ""
    passed = result.ok and code == 0
    note = (f"nvattest (local verifier) in the guest: {message or 'result_code 0'}" if passed
            else f"nvattest in the guest failed: {message or result.first_line()}")
    return GpuEvidence(guest_text(status) if status else None, cc_note, passed, note)


def collect(guest: GuestExec, nonce: bytes, gpus: int | None = None) -> Evidence:
    provider, quote, generation = fetch_quote(guest, nonce)
    event_log, event_note = fetch_event_log(guest)
    return Evidence(provider, quote, generation, event_log, event_note, fetch_gpu(guest, gpus))
