"""The attestation checks: each says pass, fail or not-checked, with its own message.

Never a blanket "ok": a check that could not run says why (no prediction, no
collateral, not in this quote), and a failure names the value found and the one
expected. What each check proves:
- quote format: the bytes are one TDX quote (quote.py), nothing more;
- REPORTDATA: the quote was made for this request (the nonce sent, see evidence.py),
  not replayed from an earlier one;
- debug: TDATTRIBUTES.DEBUG is clear, so the host cannot read or change the TD;
- MRTD, RTMR0-3: the TD's initial contents (firmware) and what it measured at boot are
  the predicted ones (tdxvirt.domain.measure); a register with no prediction is not checked;
- quote signature: a DCAP verifier (dcap.py) traced the quote to Intel's root CA with
  current collateral; only then do the values above come from the TDX module rather
  than from whoever produced the bytes;
- platform TCB: Intel's TCB status for this platform (UpToDate passes; any other
  status, with its advisories, fails: the owner decides whether to accept it);
- event log replay: the CCEL's events extend RTMR0-2 (RTMR3 when it has events for
  it) to the quote's values, so its events describe what was measured (eventlog.py).
The GPU checks are the guest's own account (its nvidia-smi, its verifier run), not
verified by the host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import QuoteFormatError
from .eventlog import CcEvent, EventLogFormatError, parse_event_log
from .quote import TdQuote, parse_quote

PASS, FAIL, NOT_CHECKED = "pass", "fail", "not-checked"
SIGNATURE = "quote signature (DCAP)"  # without a pass here nothing else is proven
REPORT_DATA_SIZE = 64
HEX96 = re.compile(r"^[0-9a-f]{96}$")
RTMR3_NOTE = "extended at run time by the guest's own software; no prediction exists"


@dataclass(frozen=True)
class Check:
    name: str
    result: str  # PASS, FAIL or NOT_CHECKED
    detail: str

    def as_dict(self) -> dict:
        return {"check": self.name, "result": self.result, "detail": self.detail}


@dataclass(frozen=True)
class Prediction:
    value: str | None  # 96 lower-case hex digits, or None: not predicted
    source: str  # where the value comes from, or why there is none


@dataclass(frozen=True)
class Identity:
    """What binds a quote to one TD beyond its firmware: the MR values and the TD
    attributes root recorded when it defined (or adopted) the TD."""

    mr_config_id: bytes  # 48 bytes each; all zero when none was set
    mr_owner: bytes
    mr_owner_config: bytes
    attributes: int  # the TD attributes asked for (the launch-security policy)
    source: str = "root's record of this TD"


@dataclass(frozen=True)
class Predictions:
    mrtd: Prediction
    rtmrs: tuple[Prediction, Prediction, Prediction, Prediction]
    identity: Identity | None = None  # None: no root-owned record binds a quote to the TD


def identity_from(record) -> Identity:
    """A TD record's (tdxvirt.domain.record) MR values (base64, as libvirt and QEMU take
    them) and TD attributes."""
    import base64

    def value(text):
        return base64.b64decode(text) if text else bytes(48)

    return Identity(value(record.mr_config_id), value(record.mr_owner),
                    value(record.mr_owner_config), record.policy or 0)


# TDATTRIBUTES bits by name (Intel TDX module ABI). PKS is set by QEMU itself when the
# host CPU has it (host-passthrough), so it follows the host, not the record.
ATTRIBUTE_BITS = {0: "DEBUG", 4: "HGS_PLUS_PROF", 5: "PERF_PROF", 6: "PMT_PROF", 16: "ICSSD",
                  27: "LASS", 28: "SEPT_VE_DISABLE", 29: "MIGRATABLE", 30: "PKS", 31: "KL",
                  62: "TPA", 63: "PERFMON"}
HOST_DEPENDENT_BITS = {30}
IDENTITY = ("MRCONFIGID", "MROWNER", "MROWNERCONFIG", "TD attributes")
_UNBOUND = ("no root-owned record of this TD binds the quote to it (`tdxvirt adopt` on its host "
            "records one): a quote of any TD with this firmware would match")


def as_prediction(value: str | None, source: str) -> Prediction:
    """A 96-hex-digit value is a prediction; anything else (None, or a sentence saying
    why a register is unknown, as tdxvirt.domain.measure gives) is not."""
    text = (value or "").strip().lower()
    if HEX96.match(text):
        return Prediction(text, source)
    return Prediction(None, (value or "").strip() or source)


def predictions_from(measurements) -> Predictions:
    """From tdxvirt.domain.measure's Measurements: MRTD from the firmware read here,
    RTMR1/RTMR2 when measure predicts them. The value define recorded is never the
    expectation: it lives in the domain XML of the host under attestation, which can
    rewrite it along with the firmware."""
    if measurements.mrtd:
        mrtd = as_prediction(measurements.mrtd, f"predicted from the firmware {measurements.firmware}")
    elif measurements.recorded:
        mrtd = Prediction(None, f"{measurements.unknown or 'the firmware is not readable here'}; the "
                                f"value define recorded ({measurements.recorded}) is the attested "
                                "host's own word, not an expectation: give --firmware FILE")
    else:
        mrtd = Prediction(None, measurements.unknown or "not predicted")
    rtmrs = tuple(as_prediction(getattr(measurements, f"rtmr{i}"), "predicted by tdxvirt measure")
                  for i in range(3))
    return Predictions(mrtd, (*rtmrs, Prediction(None, RTMR3_NOTE)))


def no_predictions(reason: str) -> Predictions:
    return Predictions(Prediction(None, reason), (Prediction(None, reason),) * 3 + (Prediction(None, RTMR3_NOTE),))


def report_data_for(nonce: bytes) -> bytes:
    """The 64-byte REPORTDATA a quote for this nonce carries: the nonce itself, padded
    with zero bytes (evidence.py writes exactly this to configfs-tsm's inblob)."""
    if not 1 <= len(nonce) <= REPORT_DATA_SIZE:
        raise ValueError(f"a nonce is 1 to {REPORT_DATA_SIZE} bytes")
    return nonce + b"\0" * (REPORT_DATA_SIZE - len(nonce))


def _short(value: bytes | str, digits: int = 16) -> str:
    text = value.hex() if isinstance(value, bytes) else value
    return text if len(text) <= digits else f"{text[:digits]}..."


def check_format(raw: bytes) -> tuple[TdQuote | None, Check]:
    name = "quote format"
    try:
        quote = parse_quote(raw)
    except QuoteFormatError as error:
        return None, Check(name, FAIL, str(error))
    padding = f", {quote.padding} bytes of zero padding" if quote.padding else ""
    return quote, Check(name, PASS, f"TDX quote v{quote.version}, TD report {quote.body_version}, "
                                    f"{len(quote.signature_data)} bytes of signature data{padding}")


def check_report_data(quote: TdQuote, nonce: bytes) -> Check:
    name = "REPORTDATA is the nonce"
    expected = report_data_for(nonce)
    if quote.report_data == expected:
        return Check(name, PASS, f"REPORTDATA holds the nonce sent ({_short(nonce)})")
    return Check(name, FAIL, f"REPORTDATA is {_short(quote.report_data)}, not the nonce sent "
                             f"({_short(nonce)}): the quote was made for another request (replayed or stale)")


def check_debug(quote: TdQuote) -> Check:
    name = "TD debug off"
    attributes = quote.field("td_attributes").hex()
    if quote.debug:
        return Check(name, FAIL, f"TDATTRIBUTES {attributes} has DEBUG set: the host can read and change "
                                 "this TD's memory and state; start it without debug")
    return Check(name, PASS, f"TDATTRIBUTES {attributes}: DEBUG clear")


def check_register(name: str, found: bytes, prediction: Prediction) -> Check:
    if prediction.value is None:
        return Check(name, NOT_CHECKED, f"{found.hex()} (not predicted: {prediction.source})")
    if found.hex() == prediction.value:
        return Check(name, PASS, f"{found.hex()} as {prediction.source}")
    return Check(name, FAIL, f"{found.hex()} differs from {prediction.value} ({prediction.source}): "
                             "the TD does not run what was predicted")


def check_identity(quote: TdQuote, identity: Identity | None) -> list[Check]:
    """MRCONFIGID, MROWNER, MROWNERCONFIG and the TD attributes against root's record:
    a genuine quote of another TD (a hostile guest relaying the nonce) differs here."""
    if identity is None:
        return [Check(name, NOT_CHECKED, _UNBOUND) for name in IDENTITY]
    checks = []
    for name, field, expected in (("MRCONFIGID", "mr_config_id", identity.mr_config_id),
                                  ("MROWNER", "mr_owner", identity.mr_owner),
                                  ("MROWNERCONFIG", "mr_owner_config", identity.mr_owner_config)):
        found = quote.field(field)
        shown = "all zero" if not any(found) else found.hex()
        if found == expected:
            checks.append(Check(name, PASS, f"{shown}, as in {identity.source}"))
        else:
            wanted = "all zero (none set)" if not any(expected) else expected.hex()
            checks.append(Check(name, FAIL, f"{shown}, not {wanted} as in {identity.source}: the quote "
                                            "is another TD's (relayed by the guest?)"))
    found = int.from_bytes(quote.field("td_attributes"), "little")
    differing = [bit for bit in range(64)
                 if (found ^ identity.attributes) >> bit & 1 and bit not in HOST_DEPENDENT_BITS]
    named = ", ".join(ATTRIBUTE_BITS.get(bit, f"bit {bit}") for bit in range(64) if found >> bit & 1)
    if not differing:
        checks.append(Check("TD attributes", PASS, f"{found:#018x} ({named or 'none set'}), as in "
                                                   f"{identity.source}"))
    else:
        changes = ", ".join(f"{ATTRIBUTE_BITS.get(bit, f'bit {bit}')} "
                            f"{'set' if found >> bit & 1 else 'clear'}" for bit in differing)
        checks.append(Check("TD attributes", FAIL, f"{found:#018x}, not {identity.attributes:#018x} as in "
                                                   f"{identity.source}: {changes}"))
    return checks


def check_signature(verdict, missing: str) -> list[Check]:
    """The DCAP verifier's verdict (dcap.Verdict), or ``missing`` (why there is none)."""
    signature, tcb = SIGNATURE, "platform TCB"
    if verdict is None:
        return [Check(signature, NOT_CHECKED, missing),
                Check(tcb, NOT_CHECKED, "the quote's signature was not verified")]
    if not verdict.verified:
        return [Check(signature, FAIL, verdict.problem),
                Check(tcb, NOT_CHECKED, "the quote's signature did not verify")]
    chain = Check(signature, PASS, "the quote's signature chain verifies to Intel's SGX root CA "
                                   "with current collateral (dcap-qvl)")
    advisories = f"; advisories: {', '.join(verdict.advisories)}" if verdict.advisories else ""
    if verdict.status == "UpToDate":
        return [chain, Check(tcb, PASS, f"UpToDate{advisories}")]
    return [chain, Check(tcb, FAIL, f"{verdict.status}{advisories}: the platform's TCB is not up to date "
                                    "(update its microcode / TDX module / firmware as Intel's advisories say)")]


def check_quote(raw: bytes, nonce: bytes, predictions: Predictions, verdict=None,
                missing: str = "no collateral") -> tuple[TdQuote | None, list[Check]]:
    """Every check of a quote. ``verdict``: dcap.verify's result, or None with
    ``missing`` saying why the signature was not checked."""
    quote, shape = check_format(raw)
    if quote is None:
        skipped = "the quote could not be parsed"
        names = ["REPORTDATA is the nonce", "TD debug off", "MRTD", "RTMR0", "RTMR1", "RTMR2", "RTMR3",
                 *IDENTITY, SIGNATURE, "platform TCB"]
        return None, [shape, *(Check(name, NOT_CHECKED, skipped) for name in names)]
    checks = [shape, check_report_data(quote, nonce), check_debug(quote),
              check_register("MRTD", quote.mr_td, predictions.mrtd)]
    checks += [check_register(f"RTMR{i}", quote.rtmr(i), predictions.rtmrs[i]) for i in range(4)]
    checks += check_identity(quote, predictions.identity)
    checks += check_signature(verdict, missing)
    return quote, checks


def check_event_log(event_log: bytes | None, note: str,
                    quote: TdQuote | None) -> tuple[Check, tuple[CcEvent, ...] | None]:
    """The CCEL replayed (eventlog.py) against the quote's RTMRs, and the events the
    replay vouches for (None unless it passed). A log that does not replay to the quote
    does not describe what was measured: tampered with, or broken, so it fails. RTMR3 is
    compared only when the log has events for it: the guest's software extends it at
    run time without writing to the CCEL."""
    name = "event log replay"
    if event_log is None:
        return Check(name, NOT_CHECKED, note), None
    if quote is None:
        return Check(name, NOT_CHECKED, f"{note}; the quote could not be parsed, so there are no RTMRs "
                                        "to replay it against"), None
    try:
        log = parse_event_log(event_log)
    except EventLogFormatError as error:
        return Check(name, FAIL, f"{error} ({note}): it does not describe what was measured "
                                 "(a broken or tampered log)"), None
    compared = [i for i in range(4) if i < 3 or log.extending(3)]
    for i, value in zip(compared, log.replay()):
        if value != quote.rtmr(i):
            return Check(name, FAIL, f"RTMR{i} replayed from the event log's {len(log.extending(i))} events is "
                                     f"{_short(value)}, the quote's is {_short(quote.rtmr(i))}: the log does not "
                                     "describe what was measured (a broken or tampered log)"), None
    extended = sum(len(log.extending(i)) for i in compared)
    rtmr3 = "" if 3 in compared else "; RTMR3 has no events in the log (only software at run time extends it)"
    return (Check(name, PASS, f"the event log's {len(log.events)} events ({extended} extending) replay to the "
                              f"quote's RTMR0-{compared[-1]}{rtmr3}"),
            tuple(event for event in log.events if event.rtmr in compared))


def check_gpu(gpu) -> list[Check]:
    """evidence.GpuEvidence: the guest's own account of its GPU, labelled as such."""
    cc, verifier = "GPU CC mode (guest-reported)", "GPU attestation (guest-run verifier)"
    if gpu.cc_status is None:
        mode = Check(cc, NOT_CHECKED, gpu.cc_note)
    elif gpu.cc_status.upper() == "ON":
        mode = Check(cc, PASS, gpu.cc_note)
    else:
        mode = Check(cc, FAIL, f"{gpu.cc_note}: the GPU is not in confidential-computing mode "
                               "(`tdxvirt gpu cc-mode ADDRESS --set on` on the host, then restart the TD)")
    result = {True: PASS, False: FAIL, None: NOT_CHECKED}[gpu.verifier]
    bound = {True: PASS, False: FAIL, None: NOT_CHECKED}[gpu.nonce_bound]
    return [mode, Check(verifier, result, gpu.verifier_note),
            Check("GPU evidence nonce", bound, gpu.nonce_note),
            Check("GPU evidence (host-verified)", NOT_CHECKED,
                  GPU_HOST_VERIFY_NOTE if gpu.passed_through else gpu.nonce_note)]


# NVIDIA's verifier (nvattest attest --gpu-evidence) checks a GPU's evidence against
# NVIDIA's reference measurements (RIM service) and certificate status (OCSP), which it
# takes as service URLs only: it cannot verify from files, offline.
GPU_HOST_VERIFY_NOTE = ("not verified on this host: NVIDIA's verifier (nvattest attest "
                        "--gpu-evidence) needs NVIDIA's RIM and OCSP services, given only as URLs, "
                        "not files; the evidence is in --json for a verifier that has them")
