"""The CC event log parser and its replay into RTMRs, on a real firmware's log.

No TD runs here, so no TDVF writes a CCEL. The record format is the same one a TPM
event log has (TCG PC Client PFP spec 10.2, crypto-agile): test_rtmr boots Debian's
OVMF with a swtpm whose SHA-384 bank is active and reads the firmware's real TCG log.
That log becomes a CCEL the way TdTcg2Dxe writes one: each PCR index replaced by its
CC measurement register index (edk2 OvmfPkg/IntelTdx/TdTcg2Dxe MapPcrToMrIndex, UEFI
2.10 38.4.1: PCR 0 -> 0 MRTD, 1 and 7 -> 1 RTMR0, 2-6 -> 2 RTMR1, 8-15 -> 3 RTMR2), then
0xFF fill to the end of the log area. The quote stand-in is the recorded real quote
with its RTMRs overwritten (its signature then no longer verifies; the replay check
does not depend on it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_attest_quote import OFFSETS, V4, V4_BODY, mutate
from test_rtmr import boot_with_tpm, extend, guest_files  # noqa: F401 (fixture)
from test_rtmr import parse_event_log as reference_parse

from tdxvirt.attest.checks import FAIL, NOT_CHECKED, PASS, check_event_log
from tdxvirt.attest.eventlog import EV_NO_ACTION, SHA384, EventLogFormatError, parse_event_log
from tdxvirt.attest.quote import parse_quote
from tdxvirt.domain import bootmeasure
from tdxvirt.paths import state_dir

NOTE = "12345 bytes from /sys/firmware/acpi/tables/data/CCEL"
EV_SEPARATOR, EV_EFI_ACTION, EV_EVENT_TAG = 0x4, 0x80000007, 0x6


def mr_index(pcr: int) -> int | None:
    """edk2 MapPcrToMrIndex; None: TdTcg2Dxe refuses the PCR (logs nothing)."""
    if pcr == 0:
        return 0
    if pcr in (1, 7):
        return 1
    if 2 <= pcr <= 6:
        return 2
    if 8 <= pcr <= 15:
        return 3
    return None


def records(log: bytes) -> tuple[dict, list[tuple[int, int]]]:
    """(algorithm sizes, [(offset, length)] of each TCG_PCR_EVENT2) of a TPM log: written
    here from the spec's layout, apart from the parser under test."""
    header_size = struct.unpack_from("<I", log, 28)[0]
    count = struct.unpack_from("<I", log, 32 + 24)[0]
    sizes = dict(struct.unpack_from("<HH", log, 32 + 28 + 4 * i) for i in range(count))
    at, found = 32 + header_size, []
    while at < len(log):
        start = at
        digests = struct.unpack_from("<I", log, at + 8)[0]
        at += 12
        for _ in range(digests):
            at += 2 + sizes[struct.unpack_from("<H", log, at)[0]]
        at += 4 + struct.unpack_from("<I", log, at)[0]
        found.append((start, at - start))
    return sizes, found


def to_ccel(tpm_log: bytes, fill: int = 4096) -> bytes:
    """The TPM log as TdTcg2Dxe would have logged it: MR indices, 0xFF fill after."""
    _, found = records(tpm_log)
    out = bytearray(tpm_log[:found[0][0]])
    for start, length in found:
        record = bytearray(tpm_log[start:start + length])
        index = mr_index(struct.unpack_from("<I", record)[0])
        if index is not None:
            struct.pack_into("<I", record, 0, index)
            out += record
    return bytes(out) + b"\xff" * fill


def quote_with(rtmrs) -> bytes:
    raw = V4
    for i, value in enumerate(rtmrs):
        raw = mutate(raw, V4_BODY + OFFSETS[f"rtmr{i}"], value)
    return raw


def event_record(index: int, kind: int, data: bytes, digest: bytes | None = None) -> bytes:
    """One SHA-384-only TCG_PCR_EVENT2 (what TDVF writes)."""
    digest = hashlib.sha384(data).digest() if digest is None else digest
    return struct.pack("<III", index, kind, 1) + struct.pack("<H", SHA384) + digest + \
        struct.pack("<I", len(data)) + data


def spec_id(algorithms=((SHA384, 48),)) -> bytes:
    body = b"Spec ID Event03\0" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(algorithms))
    body += b"".join(struct.pack("<HH", a, s) for a, s in algorithms) + b"\0"
    return struct.pack("<II", 0, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(body)) + body


@pytest.fixture(scope="module")
def tpm_boot(sim, guest_files):  # noqa: F811 (fixture)
    """The real firmware's raw TCG log and the TPM's PCRs. boot_with_tpm returns the log
    parsed; its raw bytes are kept by wrapping test_rtmr's parser for the one call. The
    result is kept in the state directory next to test_rtmr's guest files (a boot takes
    a while), so test_guest_attest reads the same real log."""
    import test_rtmr

    cache = state_dir() / "fixtures" / "rtmr-guest" / "tpm-log.json"
    booted = hashlib.sha384(b"".join(path.read_bytes() for path in guest_files)).hexdigest()
    saved = json.loads(cache.read_text()) if cache.exists() else {}
    if saved.get("guest_files") == booted:  # the log of this kernel and initrd
        return base64.b64decode(saved["log"]), {int(k): v for k, v in saved["pcrs"].items()}
    kept = []

    def keep(log):
        kept.append(log)
        return reference_parse(log)

    patch = pytest.MonkeyPatch()
    patch.setattr(test_rtmr, "parse_event_log", keep)
    try:
        _, pcrs = boot_with_tpm(sim, *guest_files)
    finally:
        patch.undo()
    cache.write_text(json.dumps({"guest_files": booted, "log": base64.b64encode(kept[0]).decode(), "pcrs": pcrs}))
    return kept[0], pcrs


@pytest.fixture(scope="module")
def real_ccel(tpm_boot) -> bytes:
    return to_ccel(tpm_boot[0])


def expected_rtmrs(tpm_log: bytes) -> list[bytes]:
    """RTMR0-3 from test_rtmr's own parse of the TPM log, grouped by the mapping."""
    events = reference_parse(tpm_log)
    return [bytes.fromhex(extend(digest for pcr, kind, digest, _ in events
                                 if mr_index(pcr) == i + 1 and kind != EV_NO_ACTION)) for i in range(4)]


# --- the parser, on the real log ----------------------------------------------------------------------

def test_the_real_log_parses_to_the_events_the_reference_reads(tpm_boot, real_ccel):
    tpm_log, _ = tpm_boot
    log = parse_event_log(real_ccel)
    assert set(log.algorithms) == {0xB, SHA384}  # swtpm_setup --pcr-banks sha256,sha384
    reference = [(mr_index(pcr), kind, digest, data) for pcr, kind, digest, data in reference_parse(tpm_log)
                 if mr_index(pcr) is not None]
    assert [(e.index, e.kind, e.digests[SHA384], e.data) for e in log.events] == reference
    assert log.size == len(real_ccel) - 4096  # the fill is not an event
    assert all(len(e.digests[0xB]) == 32 for e in log.events)


def test_the_real_log_replays_to_the_firmwares_registers(tpm_boot, real_ccel, guest_files):  # noqa: F811
    tpm_log, pcrs = tpm_boot
    log = parse_event_log(real_ccel)
    replayed = log.replay()
    assert list(replayed) == expected_rtmrs(tpm_log)
    # RTMR2 gets PCR 8-15's events; this firmware logs only the stub's two, into PCR 9:
    # the replay equals the real TPM's own register
    assert {e.index for e in log.events if e.rtmr == 2} == {3}
    assert replayed[2].hex() == pcrs[9]
    assert replayed[3] == bytes(48) and log.extending(3) == []
    kernel = [e for e in log.extending(1) if e.kind == 0x80000003]
    assert [e.digests[SHA384].hex() for e in kernel] == [bootmeasure.authenticode_sha384(guest_files[0].read_bytes())]


def test_a_matching_quote_passes_and_exposes_the_events(tpm_boot, real_ccel, guest_files):  # noqa: F811
    log = parse_event_log(real_ccel)
    quote = parse_quote(quote_with(log.replay()))
    check, events = check_event_log(real_ccel, NOTE, quote)
    extending = sum(len(log.extending(i)) for i in range(3))
    assert check.result == PASS, check.detail
    assert check.detail == (f"the event log's {len(log.events)} events ({extending} extending) replay to the "
                            "quote's RTMR0-2; RTMR3 has no events in the log (only software at run time extends it)")
    assert [e.number for e in events] == [e.number for e in log.events if e.rtmr is not None]
    shown = [e.as_dict() for e in events]
    assert {e["register"] for e in shown} == {"RTMR0", "RTMR1", "RTMR2"}
    [kernel] = [e for e in shown if e["type"] == "EV_EFI_BOOT_SERVICES_APPLICATION"]
    assert kernel["register"] == "RTMR1" and kernel["index"] == 2
    assert kernel["digest"] == bootmeasure.authenticode_sha384(guest_files[0].read_bytes())
    actions = [e["description"] for e in shown if e["type"] == "EV_EFI_ACTION"]
    assert bootmeasure.CALLING in actions and bootmeasure.EBS_SUCCESS in actions
    tags = [e["description"] for e in shown if e["type"] == "EV_EVENT_TAG"]
    assert len(tags) == 2 and "Linux initrd" in tags[1] and tags[1].startswith("tag 0x")
    assert {e["description"] for e in shown if e["type"] == "EV_SEPARATOR"} == {"separator 00000000"}


def test_an_event_log_for_rtmr3_is_compared_too(tpm_boot, real_ccel):
    log_bytes = real_ccel.rstrip(b"\xff") + event_record(4, EV_EVENT_TAG, struct.pack("<II", 1, 3) + b"app")
    log = parse_event_log(log_bytes)
    assert len(log.extending(3)) == 1
    check, events = check_event_log(log_bytes, NOTE, parse_quote(quote_with(log.replay())))
    assert check.result == PASS and "replay to the quote's RTMR0-3" in check.detail
    assert events[-1].as_dict()["register"] == "RTMR3"
    wrong = list(log.replay())
    wrong[3] = bytes(48)
    check, events = check_event_log(log_bytes, NOTE, parse_quote(quote_with(wrong)))
    assert check.result == FAIL and check.detail.startswith("RTMR3 replayed from the event log's 1 events is ")
    assert events is None


# --- what does not replay fails, naming the register --------------------------------------------------

def test_a_changed_digest_fails_naming_its_register(tpm_boot, real_ccel):
    log = parse_event_log(real_ccel)
    quote = parse_quote(quote_with(log.replay()))
    _, found = records(real_ccel.rstrip(b"\xff"))
    kernel = next(e.number for e in log.events if e.kind == 0x80000003)
    start = found[kernel - 1][0]
    digest_at = real_ccel.index(log.events[kernel - 1].digests[SHA384], start)
    tampered = mutate(real_ccel, digest_at, bytes([real_ccel[digest_at] ^ 1]))
    check, events = check_event_log(tampered, NOTE, quote)
    assert check.result == FAIL and events is None
    assert check.detail.startswith(f"RTMR1 replayed from the event log's {len(log.extending(1))} events is ")
    assert check.detail.endswith("the log does not describe what was measured (a broken or tampered log)")
    assert quote.rtmr(1).hex()[:16] in check.detail


def test_a_dropped_event_fails(tpm_boot, real_ccel):
    log = parse_event_log(real_ccel)
    quote = parse_quote(quote_with(log.replay()))
    _, found = records(real_ccel.rstrip(b"\xff"))
    [(start, length)] = [found[e.number - 1] for e in log.events if e.rtmr == 2][:1]
    check, _ = check_event_log(real_ccel[:start] + real_ccel[start + length:], NOTE, quote)
    assert check.result == FAIL and check.detail.startswith("RTMR2 replayed from the event log's 1 events")


def test_no_log_and_no_quote_are_not_checked(real_ccel):
    check, events = check_event_log(None, "no CC event log: why", parse_quote(V4))
    assert (check.result, check.detail, events) == (NOT_CHECKED, "no CC event log: why", None)
    check, _ = check_event_log(real_ccel, NOTE, None)
    assert check.result == NOT_CHECKED and "the quote could not be parsed" in check.detail


@pytest.mark.parametrize("damage, words", [
    (lambda log: log[:len(log) - 4096 - 3], "the CC event log is truncated: event"),
    (lambda log: log[:40], "the CC event log is truncated: the Spec ID event needs"),
    (lambda log: b"\xff" * 64, "the CC event log is empty"),
    (lambda log: b"", "the CC event log is empty"),
    (lambda log: struct.pack("<II", 0, 5) + log[8:], "does not start with the Spec ID event"),
])
def test_damaged_real_logs_are_one_line(real_ccel, damage, words):
    with pytest.raises(EventLogFormatError) as error:
        parse_event_log(damage(real_ccel))
    assert words in str(error.value) and "\n" not in str(error.value)
    check, _ = check_event_log(damage(real_ccel), NOTE, parse_quote(V4))
    assert check.result == FAIL and words in check.detail and NOTE in check.detail


@pytest.mark.parametrize("log, words", [
    (spec_id() + struct.pack("<III", 1, 4, 0xFFFFFFFF), "has 4294967295 digests; the log has 1 algorithms"),
    (spec_id() + event_record(1, 4, b"\0" * 4)[:-8] + struct.pack("<I", 0xFFFFFFF0) + b"\0" * 4,
     "declares 4294967280 bytes of data"),
    (spec_id() + event_record(1, 4, b"\0" * 4)[:-8] + struct.pack("<I", 4096) + b"\0" * 4,
     "is truncated: event 1's data needs 4096 bytes"),
    (spec_id(((SHA384, 48),) * 0) + event_record(1, 4, b""), "names 0 digest algorithms"),
    (spec_id(((0x4, 20),) * 9), "names 9 digest algorithms"),
    (spec_id(((SHA384, 20),)), "gives algorithm 0xc 20-byte digests; they are 48 bytes"),
    (spec_id(((0x99, 0xFFFF),)), "65535-byte digests, which no digest algorithm has"),
    (spec_id(((0xB, 32),)), "has no SHA-384 digests"),
    (spec_id() + event_record(9, 4, b"\0" * 4), "names measurement register index 9"),
    (spec_id((((0xB, 32)), (SHA384, 48))) + struct.pack("<IIIH", 1, 4, 1, 0xB) + bytes(32) + b"\0" * 4,
     "event 1 extends RTMR0 without a SHA-384 digest"),
    (spec_id() + struct.pack("<IIIH", 1, 4, 1, 0xB) + bytes(52), "algorithm 0xb, which its Spec ID event"),
    (spec_id() + event_record(1, 4, b"\0" * 4) * 10_001, "more than 10000 events"),
])
def test_absurd_lengths_and_counts_are_one_line(log, words):
    with pytest.raises(EventLogFormatError) as error:
        parse_event_log(log)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_a_small_tdvf_shaped_log_replays_by_hand():
    """SHA-384 only, as TDVF logs: the replay is the extend rule applied by hand."""
    log = spec_id() + event_record(1, 0x8000000A, b"\x05TdHob") + event_record(2, EV_EFI_ACTION, b"\x1b[2Jhi") \
        + event_record(0, 4, b"\0" * 4) + event_record(2, EV_NO_ACTION, b"x") + b"\0" * 16 + b"\xff" * 16
    parsed = parse_event_log(log)
    assert [e.rtmr for e in parsed.events] == [0, 1, None, None]
    assert parsed.replay()[0] == hashlib.sha384(bytes(48) + hashlib.sha384(b"\x05TdHob").digest()).digest()
    assert parsed.replay()[1] == hashlib.sha384(bytes(48) + hashlib.sha384(b"\x1b[2Jhi").digest()).digest()
    assert [e.description() for e in parsed.events] == ["TdHob", "\\x1b[2Jhi", "separator 00000000", None]
    assert parsed.events[2].register == "MRTD"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=600))
def test_any_bytes_give_a_log_or_one_line(raw):
    for log in (raw, spec_id() + raw, spec_id(((0xB, 32), (SHA384, 48))) + raw):
        try:
            parsed = parse_event_log(log)
        except EventLogFormatError as error:
            assert "\n" not in str(error)
        else:
            assert all(len(value) == 48 for value in parsed.replay())
            assert all(json.dumps(e.as_dict()) for e in parsed.events)


def test_any_cut_or_changed_byte_of_the_real_log_gives_a_result_or_one_line(real_ccel):
    quote = parse_quote(quote_with(parse_event_log(real_ccel).replay()))
    end = len(real_ccel.rstrip(b"\xff"))

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(cut=st.integers(min_value=0, max_value=len(real_ccel)), at=st.integers(min_value=0, max_value=end - 1),
           value=st.integers(min_value=0, max_value=255))
    def check(cut, at, value):
        damaged = mutate(real_ccel, at, bytes([value]))[:cut]
        result, events = check_event_log(damaged, NOTE, quote)
        assert result.result in (PASS, FAIL) and "\n" not in result.detail
        assert (events is not None) == (result.result == PASS)

    check()
