"""TDX quote parsing and checking, on real quotes published with an open-source verifier.

The quotes and their collateral are dcap-qvl's samples (tests/data/quotes/README.md:
repository, path and commit): a v4 quote (TD report 1.0) that verifies UpToDate with
its collateral inside the collateral's validity window, a v5 quote (TD report 1.5) whose
TCB the verifier matches to no level, and a v4 quote from Phala's tappd without
collateral. Every field this parser reads is compared with dcap-qvl's own parser (an
independent implementation of the same layout). The mutated copies are those quotes
with one field changed (a flipped MRTD bit, the debug bit set, another REPORTDATA) or
cut short; each is caught with its own message, and the real DCAP verifier rejects each
changed copy's signature.
"""

from __future__ import annotations

import http.server
import json
import os
import struct
import threading
from datetime import datetime
from pathlib import Path

import dcap_qvl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdxvirt.attest import CollateralError, QuoteFormatError
from tdxvirt.attest import dcap as dcap_verifier
from tdxvirt.attest.checks import (
    FAIL,
    NOT_CHECKED,
    PASS,
    Identity,
    Prediction,
    Predictions,
    as_prediction,
    check_quote,
    no_predictions,
    predictions_from,
    report_data_for,
)
from tdxvirt.attest.quote import BODY_10_FIELDS, BODY_15_EXTRA, parse_quote
from tdxvirt.domain.measure import Measurements

DATA = Path(__file__).parent / "data" / "quotes"
V4 = (DATA / "tdx_quote").read_bytes()
V5 = (DATA / "tdx_quote_outdated").read_bytes()
TAPPD = bytes.fromhex((DATA / "quote-from-tappd.hex").read_text().strip())
V4_COLLATERAL = DATA / "tdx_quote_collateral.json"
V5_COLLATERAL = DATA / "tdx_quote_outdated_collateral.json"
V4_BODY, V5_BODY = 48, 54  # the TD report body's offset: after the header (v5: and its descriptor)
OFFSETS = {}
_at = 0
for _name, _size in BODY_10_FIELDS + BODY_15_EXTRA:
    OFFSETS[_name] = _at
    _at += _size


def epoch(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())


# Inside each sample collateral's validity window (its TCB info, QE identity and CRLs
# all current): the verification time dcap-qvl's own tests use is the window's end.
V4_VALID_AT = epoch("2025-07-01T00:00:00Z")
V5_VALID_AT = epoch("2026-03-01T00:00:00Z")


def mutate(raw: bytes, offset: int, data: bytes) -> bytes:
    return raw[:offset] + data + raw[offset + len(data):]


def flip(raw: bytes, offset: int, mask: int = 0x01) -> bytes:
    return mutate(raw, offset, bytes([raw[offset] ^ mask]))


def matching(quote_raw: bytes) -> Predictions:
    """Predictions equal to what dcap-qvl's parser reads from the quote, bound to the TD
    the quote is of (its MR values and TD attributes, as root's record would hold them)."""
    report = dcap_qvl.parse_quote(quote_raw).report
    identity = Identity(report.mr_config_id, report.mr_owner, report.mr_owner_config,
                        int.from_bytes(report.td_attributes, "little"))
    return Predictions(Prediction(report.mr_td.hex(), "predicted"),
                       tuple(Prediction(getattr(report, f"rt_mr{i}").hex(), "predicted") for i in range(4)),
                       identity)


def by_name(checks) -> dict:
    return {check.name: check for check in checks}


# --- parsing -------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, version, body", [(V4, 4, "1.0"), (V5, 5, "1.5"), (TAPPD, 4, "1.0")])
def test_every_field_matches_dcap_qvls_parser(raw, version, body):
    quote = parse_quote(raw)
    theirs = dcap_qvl.parse_quote(raw)
    assert (quote.version, quote.body_version) == (version, body)
    assert quote.version == theirs.header.version
    assert quote.tee_type == theirs.header.tee_type == 0x81
    assert quote.attestation_key_type == theirs.header.attestation_key_type
    assert quote.qe_vendor_id == theirs.header.qe_vendor_id
    report = theirs.report
    names = {"rtmr0": "rt_mr0", "rtmr1": "rt_mr1", "rtmr2": "rt_mr2", "rtmr3": "rt_mr3"}
    for field, _ in BODY_10_FIELDS + (BODY_15_EXTRA if body == "1.5" else ()):
        assert quote.field(field) == getattr(report, names.get(field, field)), field
    assert quote.certification_data_type == 6  # QE report certification data (A.3.9)
    assert not quote.debug


def test_zero_padding_after_the_signature_is_counted_not_refused():
    quote = parse_quote(V4)
    # The sample ends with 70 zero bytes after its 4300 bytes of signature data.
    assert (len(quote.signature_data), quote.padding) == (4300, 70)
    assert quote.signed_length == len(V4) - 70
    assert parse_quote(V4[:quote.signed_length]).padding == 0


@pytest.mark.parametrize("cut, message", [
    (0, "the quote is empty"),
    (20, "it ends at byte 20, inside its 48-byte header"),
    (48 + 300, "it ends at byte 348, inside its 584-byte TD report body"),
    (48 + 584 + 2, "inside its signature data length"),
    (48 + 584 + 4 + 1000, "its signature data declares 4300 bytes, 1000 are present"),
])
def test_truncated_v4_quotes_say_where_they_end(cut, message):
    with pytest.raises(QuoteFormatError, match=message):
        parse_quote(V4[:cut])


def test_truncated_v5_quotes_name_the_descriptor_and_the_15_body():
    with pytest.raises(QuoteFormatError, match="inside its TD quote body descriptor"):
        parse_quote(V5[:50])
    with pytest.raises(QuoteFormatError, match="inside its 648-byte TD report body"):
        parse_quote(V5[:54 + 600])


def test_what_is_not_a_td_quote_is_named():
    with pytest.raises(QuoteFormatError, match="SGX quote"):
        parse_quote(mutate(V4, 4, struct.pack("<I", 0)))
    with pytest.raises(QuoteFormatError, match="quote version 3 is not"):
        parse_quote(mutate(V4, 0, struct.pack("<H", 3)))
    with pytest.raises(QuoteFormatError, match="attestation key type 3"):
        parse_quote(mutate(V4, 2, struct.pack("<H", 3)))
    with pytest.raises(QuoteFormatError, match="quote body type 1 is not a TD report"):
        parse_quote(mutate(V5, 48, struct.pack("<H", 1)))
    with pytest.raises(QuoteFormatError, match="body type 3 declares 584 bytes; its size is 648"):
        parse_quote(mutate(V5, 50, struct.pack("<I", 584)))
    with pytest.raises(QuoteFormatError, match="70 bytes follow the quote's signature data and are not padding"):
        parse_quote(V4[:-1] + b"\x01")


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(min_value=0, max_value=len(V5)), offset=st.integers(min_value=0, max_value=len(V5) - 1),
       value=st.integers(min_value=0, max_value=255))
def test_any_cut_or_changed_byte_parses_or_is_one_format_error(cut, offset, value):
    for raw in (V5[:cut], mutate(V5, offset, bytes([value]))):
        try:
            parse_quote(raw)
        except QuoteFormatError as error:
            assert "\n" not in str(error)


# --- the checks on the real quotes and their mutations --------------------------------------

def test_the_v4_sample_passes_every_check_in_its_collateral_window():
    collateral = dcap_verifier.load_collateral(str(V4_COLLATERAL))
    verdict = dcap_verifier.verify(V4, collateral, V4_VALID_AT)
    nonce = parse_quote(V4).report_data  # the publisher's REPORTDATA, as if it were our nonce
    quote, checks = check_quote(V4, nonce, matching(V4), verdict)
    results = {check.name: check.result for check in checks}
    assert set(results.values()) == {PASS}, checks
    assert list(results) == ["quote format", "REPORTDATA is the nonce", "TD debug off", "MRTD", "RTMR0",
                             "RTMR1", "RTMR2", "RTMR3", "MRCONFIGID", "MROWNER", "MROWNERCONFIG",
                             "TD attributes", "quote signature (DCAP)", "platform TCB"]
    assert by_name(checks)["TD attributes"].detail.startswith("0x0000000010000000 (SEPT_VE_DISABLE)")
    assert by_name(checks)["platform TCB"].detail == "UpToDate"
    assert by_name(checks)["quote format"].detail == ("TDX quote v4, TD report 1.0, 4300 bytes of signature "
                                                      "data, 70 bytes of zero padding")


def test_a_flipped_mrtd_bit_fails_mrtd_and_the_signature():
    changed = flip(V4, V4_BODY + OFFSETS["mr_td"] + 47)
    collateral = dcap_verifier.load_collateral(str(V4_COLLATERAL))
    verdict = dcap_verifier.verify(changed, collateral, V4_VALID_AT)
    _, checks = check_quote(changed, parse_quote(V4).report_data, matching(V4), verdict)
    checks = by_name(checks)
    assert checks["MRTD"].result == FAIL
    assert checks["MRTD"].detail.endswith(f"differs from {parse_quote(V4).mr_td.hex()} (predicted): the TD "
                                          "does not run what was predicted")
    assert checks["quote signature (DCAP)"].result == FAIL
    assert checks["quote signature (DCAP)"].detail.startswith("dcap-qvl refused the quote: ")
    assert checks["platform TCB"].result == NOT_CHECKED
    assert [c for c in checks.values() if c.result == FAIL] == [checks["MRTD"], checks["quote signature (DCAP)"]]


def test_the_debug_bit_fails_the_debug_check_and_the_signature():
    changed = flip(V4, V4_BODY + OFFSETS["td_attributes"])
    collateral = dcap_verifier.load_collateral(str(V4_COLLATERAL))
    verdict = dcap_verifier.verify(changed, collateral, V4_VALID_AT)
    _, checks = check_quote(changed, parse_quote(V4).report_data, matching(V4), verdict)
    checks = by_name(checks)
    assert checks["TD debug off"].result == FAIL
    assert checks["TD debug off"].detail == ("TDATTRIBUTES 0100001000000000 has DEBUG set: the host can read "
                                             "and change this TD's memory and state; start it without debug")
    assert checks["MRTD"].result == PASS
    assert checks["quote signature (DCAP)"].result == FAIL


def test_another_nonce_fails_reportdata_with_its_own_message():
    _, checks = check_quote(V4, b"\x01" * 32, matching(V4))
    check = by_name(checks)["REPORTDATA is the nonce"]
    assert check.result == FAIL
    assert check.detail == ("REPORTDATA is 9a9d48e7f6799642..., not the nonce sent (0101010101010101...): "
                            "the quote was made for another request (replayed or stale)")
    changed = flip(V4, V4_BODY + OFFSETS["report_data"] + 63)  # the quote's REPORTDATA changed instead
    _, checks = check_quote(changed, parse_quote(V4).report_data, matching(V4))
    assert by_name(checks)["REPORTDATA is the nonce"].result == FAIL


def test_a_truncated_quote_fails_its_format_and_checks_nothing_else():
    _, checks = check_quote(V4[:1000], b"nonce", matching(V4))
    assert checks[0].result == FAIL and "truncated" in checks[0].detail
    assert {c.result for c in checks[1:]} == {NOT_CHECKED}
    assert {c.detail for c in checks[1:]} == {"the quote could not be parsed"}


def test_the_nonce_is_zero_padded_to_64_bytes():
    assert report_data_for(b"\xab" * 64) == b"\xab" * 64
    assert report_data_for(b"\x01\x02") == b"\x01\x02" + b"\0" * 62
    with pytest.raises(ValueError):
        report_data_for(b"\0" * 65)


def test_the_v5_sample_parses_and_its_tcb_is_refused_by_the_verifier():
    collateral = dcap_verifier.load_collateral(str(V5_COLLATERAL))
    verdict = dcap_verifier.verify(V5, collateral, V5_VALID_AT)
    assert not verdict.verified and not verdict.expired
    assert verdict.problem == "dcap-qvl refused the quote: No matching TCB level found"
    _, checks = check_quote(V5, parse_quote(V5).report_data, matching(V5), verdict)
    checks = by_name(checks)
    assert checks["quote format"].detail.startswith("TDX quote v5, TD report 1.5")
    assert checks["MRTD"].result == PASS and checks["REPORTDATA is the nonce"].result == PASS


def test_unpredicted_registers_are_not_checked_with_the_reason():
    _, checks = check_quote(V4, parse_quote(V4).report_data, no_predictions("the firmware is on the remote host"))
    checks = by_name(checks)
    for name in ("MRTD", "RTMR0", "RTMR1", "RTMR2"):
        assert checks[name].result == NOT_CHECKED
        assert checks[name].detail.endswith("(not predicted: the firmware is on the remote host)")
    assert "extended at run time" in checks["RTMR3"].detail
    assert checks["quote signature (DCAP)"].result == NOT_CHECKED
    assert checks["quote signature (DCAP)"].detail == "no collateral"


def test_predictions_from_measure_take_only_96_hex_digits():
    mrtd = parse_quote(V4).mr_td.hex()
    why = "not predicted: the TD boots from its disk"  # measure's sentences: not a value
    measured = Measurements("td", "/fw/OVMF.fd", mrtd, "single-pass", "", rtmr1="AB" * 48, rtmr2=why)
    predictions = predictions_from(measured)
    assert predictions.mrtd == Prediction(mrtd, "predicted from the firmware /fw/OVMF.fd")
    assert predictions.rtmrs[0] == Prediction(None, measured.rtmr0)
    assert predictions.rtmrs[1].value == "ab" * 48
    assert predictions.rtmrs[2] == Prediction(None, why)
    remote = Measurements("td", "/fw/OVMF.fd", None, "single-pass", "", unknown="on the host", recorded=mrtd)
    recorded = predictions_from(remote).mrtd  # the attested host's own word: never expected
    assert recorded.value is None and mrtd in recorded.source and "--firmware FILE" in recorded.source
    assert as_prediction("abc", "x") == Prediction(None, "abc")


# --- collateral: its window, expiry, files, a PCCS ---------------------------------------------

def test_the_collateral_window_is_the_intersection_of_its_parts():
    collateral = dcap_verifier.load_collateral(str(V4_COLLATERAL))
    assert collateral.as_dict()["valid_from"] == "2025-06-19 10:32:27 UTC"  # QE identity's issueDate
    assert collateral.as_dict()["valid_until"] == "2025-07-19 10:00:35 UTC"  # PCK CRL's nextUpdate
    assert set(collateral.parts) == {"TCB info", "QE identity", "root CA CRL", "PCK CRL"}


def test_expired_collateral_is_said_so_and_fails_the_signature_check():
    collateral = dcap_verifier.load_collateral(str(V4_COLLATERAL))
    verdict = dcap_verifier.verify(V4, collateral, epoch("2026-12-01T00:00:00Z"))
    assert verdict.expired and not verdict.verified
    assert verdict.problem == ("collateral expired on 2025-07-19 10:00:35 UTC (its PCK CRL); fetch current "
                               "collateral (a PCCS, or a fresh collateral file)")
    early = dcap_verifier.verify(V4, collateral, epoch("2025-01-01T00:00:00Z"))
    assert "is before the collateral's validity (from 2025-06-19 10:32:27 UTC)" in early.problem


def test_bad_collateral_files_are_one_line_errors(tmp_path):
    with pytest.raises(CollateralError, match="collateral file .*none.json does not exist"):
        dcap_verifier.load_collateral(str(tmp_path / "none.json"))
    os.mkfifo(tmp_path / "fifo.json")  # refused at once, never a hang; /dev/zero never read
    for special, kind in ((tmp_path / "fifo.json", "a FIFO"), ("/dev/zero", "a character device")):
        with pytest.raises(CollateralError, match=f"is {kind}, not a regular file"):
            dcap_verifier.load_collateral(str(special))
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(CollateralError, match="is not JSON"):
        dcap_verifier.load_collateral(str(tmp_path / "text.json"))
    data = json.loads(V4_COLLATERAL.read_text())
    del data["pck_crl"]
    (tmp_path / "partial.json").write_text(json.dumps(data))
    with pytest.raises(CollateralError, match="lacks pck_crl"):
        dcap_verifier.load_collateral(str(tmp_path / "partial.json"))
    data = json.loads(V4_COLLATERAL.read_text())
    data["root_ca_crl"] = data["root_ca_crl"][:40]
    (tmp_path / "cut.json").write_text(json.dumps(data))
    with pytest.raises(CollateralError, match="is malformed"):
        dcap_verifier.load_collateral(str(tmp_path / "cut.json"))


def _collateral_with(part: str, **fields) -> dict:
    """The v4 sample collateral with fields of its TCB info or QE identity JSON changed."""
    data = json.loads(V4_COLLATERAL.read_text())
    body = json.loads(data[part])  # dcap-qvl keeps the inner object: issueDate at its top level
    body.update(fields)
    data[part] = json.dumps(body)
    return data


@pytest.mark.parametrize("value", [20250619, None, ["2025-06-19T10:32:27Z"], {"at": 1}, True])
def test_a_date_that_is_not_a_string_is_one_line(value):
    for part in ("tcb_info", "qe_identity"):
        with pytest.raises(CollateralError) as error:
            dcap_verifier.collateral_from(_collateral_with(part, issueDate=value), "file c.json")
        assert str(error.value).startswith("collateral file c.json is malformed (a date that is not a string")
        assert "\n" not in str(error.value)


def test_a_date_without_an_offset_is_utc_not_local_time(monkeypatch):
    import time

    monkeypatch.setenv("TZ", "Pacific/Kiritimati")  # UTC+14: local reading would move it by 14 hours
    time.tzset()
    try:
        sample = dcap_verifier.collateral_from(json.loads(V4_COLLATERAL.read_text()), "sample")
        naive = _collateral_with("qe_identity", issueDate="2025-06-19T10:32:27")
        assert dcap_verifier.collateral_from(naive, "naive").parts["QE identity"] == sample.parts["QE identity"]
        offset = _collateral_with("qe_identity", issueDate="2025-06-19T12:32:27+02:00")
        assert dcap_verifier.collateral_from(offset, "offset").parts["QE identity"] == sample.parts["QE identity"]
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("value", [64, None, {"der": "00"}, [300], "zz"])
def test_a_crl_that_is_neither_hex_nor_bytes_is_one_line(value):
    data = json.loads(V4_COLLATERAL.read_text())
    data["pck_crl"] = value
    with pytest.raises(CollateralError, match="^collateral c is malformed"):
        dcap_verifier.collateral_from(data, "c")


_ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=3), max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(part=st.sampled_from(["tcb_info", "qe_identity"]), key=st.sampled_from(["issueDate", "nextUpdate"]),
       value=_ANY_JSON | st.datetimes().map(lambda d: d.isoformat()))
def test_any_date_value_gives_a_window_or_one_collateral_error(part, key, value):
    try:
        collateral = dcap_verifier.collateral_from(_collateral_with(part, **{key: value}), "c")
    except CollateralError as error:
        assert "\n" not in str(error)
    else:
        assert isinstance(collateral.not_before, int) and isinstance(collateral.not_after, int)


def test_an_unreachable_pccs_is_one_line():
    with pytest.raises(CollateralError) as error:
        dcap_verifier.fetch_collateral("https://127.0.0.1:1", V4, timeout=20)
    assert str(error.value).startswith("cannot fetch collateral from PCCS https://127.0.0.1:1: ")
    assert "\n" not in str(error.value)


def test_a_pccs_that_answers_404_is_one_line():
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        with pytest.raises(CollateralError) as error:
            dcap_verifier.fetch_collateral(url, V4, timeout=20)
    finally:
        server.shutdown()
        server.server_close()
    assert str(error.value).startswith(f"cannot fetch collateral from PCCS {url}: ")
    assert "\n" not in str(error.value)


def test_crl_times_are_read_from_the_der():
    data = json.loads(V4_COLLATERAL.read_text())
    assert dcap_verifier.crl_window(bytes.fromhex(data["pck_crl"])) == (epoch("2025-06-19T10:00:35Z"),
                                                                          epoch("2025-07-19T10:00:35Z"))
    with pytest.raises(ValueError):
        dcap_verifier.crl_window(bytes.fromhex(data["pck_crl"])[:30])


def test_a_genuine_quote_of_another_td_fails_its_identity_by_name():
    """The review's relay: dcap-qvl's real, validly signed sample quote (MRCONFIGID all
    zero) presented for a TD root recorded with another MRCONFIGID: the signature,
    MRTD and RTMRs all pass, MRCONFIGID fails, and the attestation is not ok."""
    import dataclasses

    collateral = dcap_verifier.load_collateral(str(V4_COLLATERAL))
    verdict = dcap_verifier.verify(V4, collateral, V4_VALID_AT)
    ours = matching(V4)
    other = dataclasses.replace(ours, identity=dataclasses.replace(ours.identity,
                                                                   mr_config_id=b"\x01" * 48))
    _, checks = check_quote(V4, parse_quote(V4).report_data, other, verdict)
    found = by_name(checks)
    assert found["quote signature (DCAP)"].result == PASS and found["MRTD"].result == PASS
    assert found["MRCONFIGID"].result == FAIL
    assert found["MRCONFIGID"].detail.startswith("all zero, not 0101") and "another TD's" in found["MRCONFIGID"].detail


@pytest.mark.parametrize("bit", [b for b in range(64) if b != 30])  # PKS follows the host's CPU
def test_every_td_attribute_bit_flipped_is_caught_by_name(bit):
    from tdxvirt.attest.checks import ATTRIBUTE_BITS, check_identity

    quote = parse_quote(V4)
    identity = matching(V4).identity
    attributes = int.from_bytes(quote.field("td_attributes"), "little") ^ (1 << bit)
    flipped = parse_quote(V4[:V4_BODY + OFFSETS["td_attributes"]] + attributes.to_bytes(8, "little")
                          + V4[V4_BODY + OFFSETS["td_attributes"] + 8:])
    check = by_name(check_identity(flipped, identity))["TD attributes"]
    assert check.result == FAIL
    assert ATTRIBUTE_BITS.get(bit, f"bit {bit}") in check.detail


def test_no_record_leaves_the_identity_not_checked_and_the_quote_not_bound():
    from tdxvirt.attest.checks import IDENTITY, check_identity

    checks = check_identity(parse_quote(V4), None)
    assert [c.name for c in checks] == list(IDENTITY)
    assert {c.result for c in checks} == {NOT_CHECKED}
    assert "no root-owned record" in checks[0].detail
