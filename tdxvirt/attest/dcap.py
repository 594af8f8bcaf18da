"""The quote's signature chain and its platform's TCB, checked by a DCAP verifier.

The verifier is dcap-qvl (Phala Network's Rust implementation of Intel's DCAP quote
verification, with Python bindings): it checks the PCK certificate chain up to Intel's
SGX root CA, the CRLs, the QE report and its signature, the quote's signature by the
attestation key, and matches the platform's TCB against Intel's TCB info. It needs the
collateral Intel's PCS publishes (TCB info, QE identity, their issuer chains, the CRLs)
as of a moment in time:
- offline, a collateral file in dcap-qvl's JSON form (what ``QuoteCollateralV3.to_json``
  writes; its ``sample/*_collateral.json`` files have this form);
- online, a PCCS (Intel's caching service, or any PCS-compatible URL) that dcap-qvl
  asks for the quote's FMSPC.

Collateral expires (TCB info and QE identity carry ``nextUpdate``, the CRLs theirs): the
window in which all of it is valid is worked out here first, so that an expired file is
reported as "collateral expired on <date>", not as the verifier's internal error name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

from . import CollateralError

COLLATERAL_KEYS = ("pck_crl_issuer_chain", "root_ca_crl", "pck_crl", "tcb_info_issuer_chain",
                   "tcb_info", "tcb_info_signature", "qe_identity_issuer_chain", "qe_identity",
                   "qe_identity_signature")
FETCH_TIMEOUT = 30.0
UP_TO_DATE = "UpToDate"


def when(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _iso(text) -> int:
    """issueDate / nextUpdate of TCB info or QE identity. Intel's PCS API spec says these
    are ISO 8601 times in UTC ("The time shall be in UTC"), so one without an offset is
    read as UTC, never in this machine's local time zone."""
    if not isinstance(text, str):
        raise TypeError(f"a date that is not a string: {text!r:.60}")
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp())


# --- the CRLs' thisUpdate / nextUpdate (RFC 5280 section 5.1: CertificateList) ----------

def _tlv(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of value, end of value) of the DER element at ``at``."""
    if at + 2 > len(der):
        raise ValueError("truncated DER")
    tag, length = der[at], der[at + 1]
    at += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(der[at:at + count], "big")
        at += count
    if at + length > len(der):
        raise ValueError("truncated DER")
    return tag, at, at + length


def _der_time(tag: int, text: str) -> int:
    if tag == 0x17:  # UTCTime, YYMMDDHHMMSSZ: years 50-99 are 19xx (RFC 5280 4.1.2.5.1)
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    return int(datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=timezone.utc).timestamp())


def crl_window(der: bytes) -> tuple[int, int | None]:
    """(thisUpdate, nextUpdate or None) of a DER CRL: TBSCertList is version (optional
    INTEGER), signature, issuer, thisUpdate, nextUpdate (optional)."""
    _, start, _ = _tlv(der, 0)  # CertificateList
    tag, at, _ = _tlv(der, start)  # tbsCertList
    tag, value, end = _tlv(der, at)  # version, when present; else the signature algorithm
    if tag == 0x02:
        tag, value, end = _tlv(der, end)  # the signature algorithm
    _, _, end = _tlv(der, end)  # issuer
    times = []
    while len(times) < 2 and end < len(der):
        tag, value, after = _tlv(der, end)
        if tag not in (0x17, 0x18):
            break
        times.append(_der_time(tag, der[value:after].decode("ascii")))
        end = after
    if not times:
        raise ValueError("no thisUpdate in the CRL")
    return times[0], (times[1] if len(times) > 1 else None)


def _crl_bytes(value) -> bytes:
    """A CRL as hex text or a list of byte values (never bytes(n) of a number, which
    would be n zero bytes)."""
    if isinstance(value, str):
        return bytes.fromhex(value)
    if isinstance(value, list):
        return bytes(value)  # ValueError / TypeError for what is not a byte
    raise TypeError(f"a CRL that is neither hex text nor a list of bytes: {type(value).__name__}")


@dataclass(frozen=True)
class Collateral:
    data: dict  # dcap-qvl's JSON fields
    source: str  # where it came from, for messages
    not_before: int  # the window in which every part is valid (epoch seconds)
    not_after: int
    parts: dict = field(default_factory=dict)  # part -> (from, until) for messages

    def as_dict(self) -> dict:
        return {"source": self.source, "valid_from": when(self.not_before), "valid_until": when(self.not_after)}


def collateral_from(data: dict, source: str) -> Collateral:
    missing = [key for key in COLLATERAL_KEYS if key not in data]
    if missing:
        raise CollateralError(f"collateral {source} lacks {', '.join(missing)}; give dcap-qvl's collateral "
                              "JSON (QuoteCollateralV3)")
    try:
        parts = {}
        for key, name in (("tcb_info", "TCB info"), ("qe_identity", "QE identity")):
            body = json.loads(data[key])
            parts[name] = (_iso(body["issueDate"]), _iso(body["nextUpdate"]))
        for key, name in (("root_ca_crl", "root CA CRL"), ("pck_crl", "PCK CRL")):
            parts[name] = crl_window(_crl_bytes(data[key]))
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as error:
        raise CollateralError(f"collateral {source} is malformed ({one_line(error)}); fetch it again") from None
    not_before = max(start for start, _ in parts.values())
    not_after = min(end for _, end in parts.values() if end is not None)
    return Collateral(data, source, not_before, not_after, parts)


COLLATERAL_LIMIT = 16 << 20  # a PCCS's collateral JSON is tens of KiB


def load_collateral(path: str) -> Collateral:
    """dcap-qvl's collateral JSON from a file: a regular file (never a FIFO or device:
    refused before a byte is read), at most COLLATERAL_LIMIT bytes."""
    from ..errors import TdxvirtError
    from ..userfile import read_user_file

    hint = "give the collateral JSON saved from a PCCS (docs/attestation.md), or --pccs-url"
    try:
        data = json.loads(read_user_file(path, "collateral file", hint, limit=COLLATERAL_LIMIT))
    except TdxvirtError as error:
        raise CollateralError(str(error)) from None
    except ValueError as error:
        raise CollateralError(f"collateral file {path} is not JSON ({error}); give dcap-qvl's "
                              "collateral JSON") from None
    if not isinstance(data, dict):
        raise CollateralError(f"collateral file {path} is not a JSON object; give dcap-qvl's collateral JSON")
    return collateral_from(data, f"file {path}")


def one_line(text: str) -> str:
    """The verifier's message (anyhow's "x\\n\\nCaused by:\\n    y") on one line."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def fetch_collateral(url: str, raw_quote: bytes, timeout: float = FETCH_TIMEOUT) -> Collateral:
    """The collateral for this quote's platform from a PCCS; CollateralError (one line)
    when it cannot be reached or answers nonsense."""
    import asyncio

    import dcap_qvl

    async def fetch():
        return await asyncio.wait_for(dcap_qvl.get_collateral(url, raw_quote), timeout)

    try:
        collateral = asyncio.run(fetch())
    except TimeoutError:
        raise CollateralError(f"PCCS {url} did not answer within {timeout:g} s") from None
    except (ValueError, RuntimeError, OSError) as error:
        raise CollateralError(f"cannot fetch collateral from PCCS {url}: {one_line(error)}") from None
    return collateral_from(json.loads(collateral.to_json()), f"from PCCS {url}")


@dataclass(frozen=True)
class Verdict:
    """What the DCAP verifier said: the signature chain verified (and the TCB status it
    found), or why not (``problem``); ``expired`` when only the collateral's age stood
    in the way."""

    verified: bool
    problem: str = ""
    status: str | None = None
    advisories: tuple[str, ...] = ()
    expired: bool = False


def verify(raw_quote: bytes, collateral: Collateral, now: int) -> Verdict:
    import dcap_qvl

    if now > collateral.not_after:
        ending = min(collateral.parts.items(), key=lambda item: item[1][1] or 2**63)[0]
        return Verdict(False, f"collateral expired on {when(collateral.not_after)} (its {ending}); "
                       "fetch current collateral (a PCCS, or a fresh collateral file)", expired=True)
    if now < collateral.not_before:
        return Verdict(False, f"the verification time {when(now)} is before the collateral's validity "
                       f"(from {when(collateral.not_before)}); check this machine's clock")
    try:
        parsed = dcap_qvl.QuoteCollateralV3.from_json(json.dumps(collateral.data))
        report = dcap_qvl.verify(raw_quote, parsed, now)
    except (ValueError, RuntimeError) as error:
        return Verdict(False, "dcap-qvl refused the quote: " + one_line(error).removeprefix("Verification failed: "))
    return Verdict(True, status=report.status, advisories=tuple(report.advisory_ids))
