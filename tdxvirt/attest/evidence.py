"""The evidence a running TD hands over through its QEMU guest agent.

The TD quote comes from the guest kernel's configfs-tsm interface (Linux >= 6.7,
CONFIG_TSM_REPORTS with the tdx_guest provider; Documentation/ABI/testing/configfs-tsm):
a new directory below ``/sys/kernel/config/tsm/report`` is one request; writing
``inblob`` sets the TD report's 64-byte REPORTDATA, reading ``outblob`` asks the
TDX module for a TD report and the host's quote service (QGS) to turn it into a quote;
``provider`` names the backend (``tdx_guest``) and ``generation`` counts writes, so a
reader that sees 1 after its single write knows no one else changed the request.
The directory is removed afterwards (a directory left behind is a note in the evidence).

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

Every value from the guest is capped (textsafe.guest_text) before it reaches a message,
and every agent reply is checked for qemu-ga's shape (verify.GuestExec): a reply of
another shape is a one-line GuestNotReadyError. Once the quote is in hand, a failure to
collect the event log or the GPU's account leaves those rows not-checked, with the reason.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from dataclasses import dataclass

from ..guest import GuestNotReadyError
from ..guest.verify import AgentCommandError, ExecResult, GuestExec
from ..textsafe import guest_text
from .checks import report_data_for

TSM_REPORTS = "/sys/kernel/config/tsm/report"
CCEL_DATA = "/sys/firmware/acpi/tables/data/CCEL"
TDX_PROVIDER = "tdx_guest"
QUOTE_LIMIT = 64 * 1024  # a TDX quote is about 5 KiB; more is not a quote
EVENT_LOG_LIMIT = 8 * 1024 * 1024
READ_CHUNK = 64 * 1024
# A hostile guest picks its reply sizes: qemu-ga's fread fills every chunk asked for
# until the end of the file, so a short chunk that is not the end is a stall (1-byte
# replies would mean millions of agent calls), and a whole read has one deadline.
MIN_PROGRESS = 4096
READ_DEADLINE = 120.0
NVATTEST = ("nvattest", "attest", "--device", "gpu", "--verifier", "local")
# The GPU's evidence is bound to the same request as the TD's quote: its SPDM nonce (32
# bytes) is derived from the quote's REPORTDATA, and `nvattest collect-evidence` in the
# guest asks the GPU to sign its report over it (docs.nvidia.com/attestation, nvattest
# "collect-evidence --nonce").
GPU_NONCE_LABEL = b"tdxvirt GPU evidence for TD REPORTDATA "
GPU_EVIDENCE_LIMIT = 1 << 20


def gpu_nonce(report_data: bytes) -> str:
    """The GPU evidence nonce for a quote's REPORTDATA: 32 bytes, hex."""
    import hashlib

    return hashlib.sha256(GPU_NONCE_LABEL + report_data).hexdigest()


def nvattest_collect(nonce_hex: str) -> tuple[str, ...]:
    return ("nvattest", "collect-evidence", "--device", "gpu", "--nonce", nonce_hex)
CC_STATUS = ("nvidia-smi", "conf-compute", "-f")


class GuestFiles:
    """The agent's file commands: whole files in and out, base64 on the wire.

    qemu-ga's guest-file-write is a buffered fwrite and its guest-file-close an fclose
    (qga/commands-posix.c): the bytes may reach the kernel only at the close, and a
    configfs binary attribute (configfs-tsm's inblob) hands them to its driver only when
    the file is released (fs/configfs/file.c). So on the write path the close is where
    the kernel's refusal shows, and it is an error; on the read path a failed close
    changes nothing that was read.
    """

    def __init__(self, guest: GuestExec):
        self.guest = guest

    def _open(self, path: str, mode: str) -> int:
        handle = self.guest.call("guest-file-open", {"path": path, "mode": mode})
        if type(handle) is not int:
            raise self.guest.malformed("guest-file-open", "a handle that is not an integer", handle)
        return handle

    def _chunk(self, handle: int) -> tuple[bytes, bool]:
        """(bytes read, at the end): GuestFileRead is count, buf-b64 and eof."""
        reply = self.guest.call("guest-file-read", {"handle": handle, "count": READ_CHUNK})
        if not isinstance(reply, dict):
            raise self.guest.malformed("guest-file-read", "a result that is not an object", reply)
        count, eof = reply.get("count"), reply.get("eof", False)
        if type(count) is not int or not isinstance(eof, bool):
            raise self.guest.malformed("guest-file-read", "no count or eof", reply)
        data = self.guest.decode("guest-file-read", "buf-b64", reply.get("buf-b64", ""))
        if len(data) != count:
            raise self.guest.malformed("guest-file-read", f"a count that is not the {len(data)} bytes it sent", count)
        if count > READ_CHUNK:
            raise self.guest.malformed("guest-file-read", f"more than the {READ_CHUNK} bytes asked for", count)
        return data, eof or not count

    def read(self, path: str, limit: int, deadline: float = READ_DEADLINE) -> bytes:
        """The whole file, at most ``limit`` bytes, within ``deadline`` seconds, each chunk
        but the last a full one (at least MIN_PROGRESS bytes)."""
        import time

        ends = time.monotonic() + deadline
        handle = self._open(path, "r")
        try:
            data = bytearray()
            while True:
                chunk, end = self._chunk(handle)
                data += chunk
                if len(data) > limit:
                    raise GuestNotReadyError(f"{path} in {self.guest.name} is larger than {limit} bytes; "
                                             "that is not what the kernel returns there")
                if end:
                    return bytes(data)
                if len(chunk) < MIN_PROGRESS:
                    raise GuestNotReadyError(
                        f"the guest agent in {self.guest.name} returned {len(chunk)} bytes of {path} "
                        f"where {READ_CHUNK} were asked for, before its end: a stalling agent; "
                        "nothing was attested")
                if time.monotonic() > ends:
                    raise GuestNotReadyError(f"reading {path} from {self.guest.name} took more than "
                                             f"{deadline:g} s; nothing was attested")
        finally:
            self._close_quietly(handle)

    def write(self, path: str, data: bytes, what: str = "the data") -> None:
        """``data`` into ``path``; ``what`` names it in the error when the kernel refuses it."""
        handle = self._open(path, "w")
        try:
            written = self.guest.call("guest-file-write", {"handle": handle,
                                                           "buf-b64": base64.b64encode(data).decode()})
            count = written.get("count") if isinstance(written, dict) else None
            if type(count) is not int:
                raise self.guest.malformed("guest-file-write", "no count", written)
            if count != len(data):
                raise GuestNotReadyError(f"the guest agent in {self.guest.name} wrote {count} "
                                         f"of {len(data)} bytes to {path}")
        except BaseException:
            self._close_quietly(handle)
            raise
        try:
            self.guest.call("guest-file-close", {"handle": handle})
        except AgentCommandError as error:
            raise GuestNotReadyError(
                f"the kernel in {self.guest.name} refused {what} written to {path} ({_reason(error)}); "
                "nothing was attested: attest again, and see the guest's kernel log if it persists") from None

    def _close_quietly(self, handle: int) -> None:
        try:
            self.guest.call("guest-file-close", {"handle": handle})
        except (AgentCommandError, GuestNotReadyError):
            pass  # read path, or an error already on its way: the close adds nothing to it


@dataclass(frozen=True)
class GpuEvidence:
    cc_status: str | None  # "ON", "OFF", ... as nvidia-smi prints it; None: not known
    cc_note: str
    verifier: bool | None  # NVIDIA's verifier in the guest: passed, failed, or not run
    verifier_note: str
    nonce_bound: bool | None = None  # every GPU evidence carries the derived nonce; None: no evidence
    nonce_note: str = "no GPU evidence was collected"
    evidence: str | None = None  # nvattest collect-evidence's JSON, as the guest gave it
    passed_through: bool = True  # False: the TD has no GPU

    def as_dict(self) -> dict:
        return {"cc_status": self.cc_status, "cc_note": self.cc_note,
                "verifier_passed": self.verifier, "verifier_note": self.verifier_note,
                "nonce_bound": self.nonce_bound, "nonce_note": self.nonce_note,
                "evidence": self.evidence}


@dataclass(frozen=True)
class Evidence:
    provider: str
    quote: bytes
    generation: int | None
    event_log: bytes | None
    event_log_note: str
    gpu: GpuEvidence
    notes: tuple[str, ...] = ()  # what went wrong around the evidence without touching it

    def as_dict(self) -> dict:
        return {"provider": self.provider, "quote_bytes": len(self.quote),
                "quote_base64": base64.b64encode(self.quote).decode(), "generation": self.generation,
                "event_log_bytes": None if self.event_log is None else len(self.event_log),
                "event_log_note": self.event_log_note, "gpu": self.gpu.as_dict(), "notes": list(self.notes)}


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


def _remove(guest: GuestExec, report: str) -> str:
    """rmdir of the report request: "" when it is gone, else a note saying it is left.
    A leftover directory holds no secret (its outblob is the quote already returned),
    so it never fails the attestation, but it is said."""
    try:
        result = guest.run(["rmdir", report])
    except AgentCommandError as error:
        why = _reason(error)
    except GuestNotReadyError as error:
        why = str(error)
    else:
        if result.ok:
            return ""
        why = result.first_line()
    return (f"the report request {report} was left in {guest.name} ({why}); it holds no secret: "
            "remove it in the guest with rmdir")


def _quote_request(guest: GuestExec, report: str, nonce: bytes) -> tuple[str, bytes, str]:
    """(provider, quote, generation as the guest wrote it) from one report directory."""
    files = GuestFiles(guest)
    try:
        provider = _text(files, f"{report}/provider")
        if provider != TDX_PROVIDER:
            raise GuestNotReadyError(f"{guest.name}'s attestation provider is {provider!r}, not {TDX_PROVIDER}: "
                                     "it is not an Intel TDX TD")
        files.write(f"{report}/inblob", report_data_for(nonce), what="the nonce (REPORTDATA)")
        try:
            quote = files.read(f"{report}/outblob", QUOTE_LIMIT)
        except AgentCommandError as error:
            raise GuestNotReadyError(
                f"{guest.name} could not get a quote ({_reason(error)}); the host's quote generation service "
                "must run and the TD must name it (<quoteGenerationService> in its launch security)") from None
        return provider, quote, _text(files, f"{report}/generation")
    except AgentCommandError as error:
        why = _reason(error)
        fix = ("; allow guest-file-open, -read, -write and -close in the agent's configuration "
               "(e.g. --allow-rpcs)") if "disabled" in why.lower() else ""
        raise GuestNotReadyError(f"reading {report} in {guest.name} failed: {why}{fix}") from None


def fetch_quote(guest: GuestExec, nonce: bytes) -> tuple[str, bytes, int | None, str]:
    """(provider, quote, generation, cleanup note) from configfs-tsm, REPORTDATA set
    from ``nonce``; the note is "" when the report directory was removed."""
    present, why = _run(guest, ["stat", "-c", "%F", TSM_REPORTS])
    if not present:
        raise _no_quote_interface(guest, why)
    report = f"{TSM_REPORTS}/tdxvirt-{secrets.token_hex(8)}"
    try:
        made, why = _run(guest, ["mkdir", report])
    except GuestNotReadyError:
        _remove(guest, report)  # the agent's answer was unreadable: the directory may exist
        raise
    if not made:
        raise GuestNotReadyError(f"cannot create a report request {report} in {guest.name}: {why}; "
                                 "the guest agent must run as root")
    try:
        provider, quote, generation_text = _quote_request(guest, report, nonce)
    finally:
        cleanup = _remove(guest, report)
    # ASCII digits only: str.isdigit() also accepts "²", which int() refuses.
    generation = int(generation_text) if re.fullmatch(r"[0-9]+", generation_text) else None
    if generation is not None and generation != 1:
        raise GuestNotReadyError(f"another writer changed the report request in {guest.name} while tdxvirt "
                                 f"used it (generation {generation}, expected 1); attest again")
    if not quote:
        raise GuestNotReadyError(f"{guest.name} returned an empty quote; the host's quote generation service "
                                 "may have failed (see its log)")
    return provider, quote, generation, cleanup


def fetch_event_log(guest: GuestExec) -> tuple[bytes | None, str]:
    """The CCEL data, or None and why not. After the quote, nothing here stops the
    attestation: a log over the cap or an agent that failed only makes it not collected."""
    try:
        data = GuestFiles(guest).read(CCEL_DATA, EVENT_LOG_LIMIT)
    except AgentCommandError as error:
        return None, f"no CC event log: {CCEL_DATA} cannot be read ({_reason(error)})"
    except GuestNotReadyError as error:
        return None, f"no CC event log: {error}"
    return data, f"{len(data)} bytes from {CCEL_DATA}"


def _run_tool(guest: GuestExec, argv) -> tuple[ExecResult | None, str]:
    """(the ExecResult, "") or (None, why it did not run): an agent error, a time-out or
    an unreadable answer leaves the GPU rows not-checked, never the attestation failed."""
    try:
        return guest.run(list(argv)), ""
    except AgentCommandError as error:
        return None, _reason(error)
    except GuestNotReadyError as error:
        return None, str(error)


def fetch_gpu_evidence(guest: GuestExec, nonce_hex: str) -> tuple[bool | None, str, str | None]:
    """(every device's evidence carries ``nonce_hex``, why, the evidence JSON) from
    `nvattest collect-evidence` in the guest; (None, why, None) when it gave none."""
    result, why = _run_tool(guest, nvattest_collect(nonce_hex))
    if result is None:
        return None, f"nvattest collect-evidence did not run in the guest: {why}", None
    text = result.stdout[:GPU_EVIDENCE_LIMIT]
    try:
        answer = json.loads(text)
    except (ValueError, RecursionError):
        answer = None
    evidences = answer.get("evidences") if isinstance(answer, dict) else None
    if not result.ok or not isinstance(evidences, list) or not evidences \
            or not all(isinstance(e, dict) for e in evidences):
        return None, f"nvattest collect-evidence in the guest gave no evidence: {result.first_line()}", None
    nonces = [str(e.get("nonce", "")).lower() for e in evidences]
    if all(n == nonce_hex for n in nonces):
        return True, (f"the GPU evidence of {len(evidences)} device(s) carries the nonce derived from "
                      f"this quote's REPORTDATA ({nonce_hex[:16]}...): made for this request"), text
    other = next(n for n in nonces if n != nonce_hex)
    return False, (f"the GPU evidence carries the nonce {guest_text(other[:64]) or 'none'}, not "
                   f"{nonce_hex} derived from this quote: replayed, or made for another request"), text


def fetch_gpu(guest: GuestExec, gpus: int | None, report_data: bytes | None = None) -> GpuEvidence:
    if gpus == 0:
        none = "the TD has no GPU passed through"
        return GpuEvidence(None, none, None, none, None, none, passed_through=False)
    smi, why = _run_tool(guest, CC_STATUS)
    if smi is None:
        status, cc_note = None, f"nvidia-smi did not run in the guest: {why}"
    else:
        status = next((line.split(":", 1)[1].strip() for line in smi.stdout.splitlines()
                       if line.strip().startswith("CC status:")), None) if smi.ok else None
        cc_note = (f"nvidia-smi in the guest: CC status: {guest_text(status)}" if status
                   else f"nvidia-smi conf-compute -f in the guest gave no CC status: {smi.first_line()}")
    result, why = _run_tool(guest, NVATTEST)
    if result is None:
        return GpuEvidence(guest_text(status) if status else None, cc_note, None,
                           f"NVIDIA's attestation CLI (nvattest) did not run in the guest: {why}",
                           None, f"nvattest is not usable in the guest: {why}")
    try:
        answer = json.loads(result.stdout)
    except (ValueError, RecursionError):
        answer = {}
    code = answer.get("result_code") if isinstance(answer, dict) else None
    message = guest_text(str(answer.get("result_message", ""))) if isinstance(answer, dict) else ""
    passed = result.ok and type(code) is int and code == 0  # not JSON false or 0.0
    note = (f"nvattest (local verifier) in the guest: {message or 'result_code 0'}" if passed
            else f"nvattest in the guest failed: {message or result.first_line()}")
    bound, bound_note, evidence = (fetch_gpu_evidence(guest, gpu_nonce(report_data))
                                   if report_data is not None else (None, "no nonce given", None))
    return GpuEvidence(guest_text(status) if status else None, cc_note, passed, note,
                       bound, bound_note, evidence)


def collect(guest: GuestExec, nonce: bytes, gpus: int | None = None) -> Evidence:
    provider, quote, generation, cleanup = fetch_quote(guest, nonce)
    event_log, event_note = fetch_event_log(guest)
    return Evidence(provider, quote, generation, event_log, event_note,
                    fetch_gpu(guest, gpus, report_data_for(nonce)),
                    notes=(cleanup,) if cleanup else ())
