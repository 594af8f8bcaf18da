"""The TDX quote's layout: header, TD report body, signature data (versions 4 and 5).

Source: Intel, "Intel TDX DCAP Quoting Library API", Appendix A (Quote Format):
- A.3 Version 4 Quote Format: A.3.1 Quote Header (48 bytes), A.3.2 TD Quote Body
  (584 bytes, TDX 1.0 fields), then a 4-byte Quote Signature Data Len and the Quote
  Signature Data; A.3.8 ECDSA 256-bit Quote Signature Data Structure - Version 4
  (signature 64, attestation key 64, then QE Certification Data, A.3.9: type u16,
  size u32, data);
- A.4 Version 5 Quote Format: the same header, then A.4.2 TD Quote Body Descriptor
  (type u16, size u32: type 2 is the TDX 1.0 body, 3 the TDX 1.5 body of A.4.4, which
  adds TEE_TCB_SVN_2 (16) and MRSERVICETD (48) after REPORTDATA), then the same
  signature data length and signature data.
All integers are little-endian. TDATTRIBUTES bit 0 is DEBUG (Intel TDX Module ABI
specification, TDATTRIBUTES: "TUD" bits 7:0, bit 0 DEBUG): the host can read and
change the TD's state and private memory.

This module only reads the layout; it proves nothing. The signature is checked by a
DCAP verifier (checks.py, with dcap-qvl), the values against predictions (checks.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import QuoteFormatError

HEADER_SIZE = 48
TDX_TEE_TYPE = 0x81
SGX_TEE_TYPE = 0x00
ECDSA_P256_KEY_TYPE = 2
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
BODY_10_SIZE = 584
BODY_15_SIZE = 648
BODY_TYPE_SIZES = {2: BODY_10_SIZE, 3: BODY_15_SIZE}  # A.4.2; type 1 is SGX
QE_REPORT_CERTIFICATION_DATA = 6  # A.3.9 certification data type 6

# The TD Quote Body (A.3.2, then A.4.4's two fields), in order: (name, size).
BODY_10_FIELDS = (("tee_tcb_svn", 16), ("mr_seam", 48), ("mr_signer_seam", 48),
                  ("seam_attributes", 8), ("td_attributes", 8), ("xfam", 8), ("mr_td", 48),
                  ("mr_config_id", 48), ("mr_owner", 48), ("mr_owner_config", 48),
                  ("rtmr0", 48), ("rtmr1", 48), ("rtmr2", 48), ("rtmr3", 48), ("report_data", 64))
BODY_15_EXTRA = (("tee_tcb_svn2", 16), ("mr_service_td", 48))
DEBUG_BIT = 1  # TDATTRIBUTES byte 0, bit 0


@dataclass(frozen=True)
class TdQuote:
    raw: bytes
    version: int
    attestation_key_type: int
    tee_type: int
    qe_vendor_id: bytes
    body_version: str  # "1.0" or "1.5"
    fields: dict  # the body's fields by name (bytes)
    signature_data: bytes
    certification_data_type: int | None
    padding: int  # zero bytes after the signature data (some quote services pad)

    def field(self, name: str) -> bytes:
        return self.fields[name]

    @property
    def mr_td(self) -> bytes:
        return self.fields["mr_td"]

    @property
    def report_data(self) -> bytes:
        return self.fields["report_data"]

    def rtmr(self, index: int) -> bytes:
        return self.fields[f"rtmr{index}"]

    @property
    def debug(self) -> bool:
        return bool(self.fields["td_attributes"][0] & DEBUG_BIT)

    @property
    def signed_length(self) -> int:
        """The quote without its zero padding (what a verifier is given)."""
        return len(self.raw) - self.padding

    def as_dict(self) -> dict:
        return {"version": self.version, "tee_type": f"{self.tee_type:#x}",
                "attestation_key_type": self.attestation_key_type,
                "qe_vendor_id": self.qe_vendor_id.hex(), "body": f"TD report {self.body_version}",
                **{name: value.hex() for name, value in self.fields.items()},
                "signature_data_bytes": len(self.signature_data),
                "certification_data_type": self.certification_data_type, "padding_bytes": self.padding}


def _need(raw: bytes, end: int, what: str) -> None:
    if len(raw) < end:
        raise QuoteFormatError(f"the quote is truncated: it ends at byte {len(raw)}, inside its {what} "
                               f"(which needs {end} bytes)")


def _body(raw: bytes, offset: int, size: int) -> dict:
    layout = BODY_10_FIELDS + (BODY_15_EXTRA if size == BODY_15_SIZE else ())
    fields, at = {}, offset
    for name, length in layout:
        fields[name] = raw[at:at + length]
        at += length
    return fields


def _certification_type(signature: bytes) -> int | None:
    """A.3.8: 64-byte signature, 64-byte attestation key, then certification data
    (type u16, size u32); None when the signature data is too short to hold them."""
    if len(signature) < 134:
        return None
    kind, size = struct.unpack_from("<HI", signature, 128)
    if 134 + size > len(signature):
        raise QuoteFormatError(f"the quote is truncated: its certification data declares {size} bytes, "
                               f"{len(signature) - 134} are present")
    return kind


def parse_quote(raw: bytes) -> TdQuote:
    """The quote's fields; QuoteFormatError (one line, saying what is wrong) otherwise."""
    raw = bytes(raw)
    if not raw:
        raise QuoteFormatError("the quote is empty")
    _need(raw, HEADER_SIZE, "48-byte header")
    version, key_type, tee_type = struct.unpack_from("<HHI", raw, 0)
    vendor = raw[12:28]
    if tee_type == SGX_TEE_TYPE:
        raise QuoteFormatError("this is an SGX quote (TEE type 0), not a TD quote")
    if tee_type != TDX_TEE_TYPE:
        raise QuoteFormatError(f"TEE type {tee_type:#x} is not TDX ({TDX_TEE_TYPE:#x}): not a TD quote")
    if version not in (4, 5):
        raise QuoteFormatError(f"quote version {version} is not a TDX quote format this parser knows (4 or 5)")
    if key_type != ECDSA_P256_KEY_TYPE:
        raise QuoteFormatError(f"attestation key type {key_type} is not ECDSA-256-with-P-256 (2)")
    offset = HEADER_SIZE
    if version == 4:
        size = BODY_10_SIZE
    else:
        _need(raw, offset + 6, "TD quote body descriptor")
        body_type, size = struct.unpack_from("<HI", raw, offset)
        if body_type not in BODY_TYPE_SIZES:
            raise QuoteFormatError(f"quote body type {body_type} is not a TD report (2: TDX 1.0, 3: TDX 1.5)")
        if size != BODY_TYPE_SIZES[body_type]:
            raise QuoteFormatError(f"quote body type {body_type} declares {size} bytes; "
                                   f"its size is {BODY_TYPE_SIZES[body_type]}")
        offset += 6
    _need(raw, offset + size, f"{size}-byte TD report body")
    fields = _body(raw, offset, size)
    offset += size
    _need(raw, offset + 4, "signature data length")
    (signature_size,) = struct.unpack_from("<I", raw, offset)
    offset += 4
    if len(raw) < offset + signature_size:
        raise QuoteFormatError(f"the quote is truncated: its signature data declares {signature_size} bytes, "
                               f"{len(raw) - offset} are present")
    signature = raw[offset:offset + signature_size]
    rest = raw[offset + signature_size:]
    if rest.strip(b"\0"):
        raise QuoteFormatError(f"{len(rest)} bytes follow the quote's signature data and are not padding: "
                               "not a single TD quote")
    return TdQuote(raw=raw, version=version, attestation_key_type=key_type, tee_type=tee_type,
                   qe_vendor_id=vendor, body_version="1.5" if size == BODY_15_SIZE else "1.0",
                   fields=fields, signature_data=signature,
                   certification_data_type=_certification_type(signature), padding=len(rest))
