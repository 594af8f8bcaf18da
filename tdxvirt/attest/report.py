"""``guest attest``: the evidence from the guest, every check here, one report.

The order matters for what a result means: the quote is fetched with a fresh nonce,
parsed, its signature verified (when collateral is at hand) and its values compared;
a value check that passes on a quote whose signature was not verified says only that
the bytes the guest returned hold that value. The report sums up as "ok" only when no
check failed, the signature verified and MRTD matched its prediction; every other
check not run is listed with its reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from . import QuoteFormatError
from . import dcap as dcap_verifier
from .checks import (
    FAIL,
    IDENTITY,
    NOT_CHECKED,
    PASS,
    SIGNATURE,
    Check,
    Predictions,
    check_event_log,
    check_gpu,
    check_quote,
    identity_from,
)
from .eventlog import CcEvent
from .evidence import Evidence, collect
from .quote import TdQuote, parse_quote

NO_COLLATERAL = ("no collateral: give --collateral FILE (dcap-qvl's collateral JSON) or a PCCS "
                 "(--pccs-url URL, or pccs_url in the config file)")


@dataclass(frozen=True)
class CollateralSource:
    """Where the signature check's collateral comes from: a file read before the guest
    is asked anything (so a bad file changes nothing), else a PCCS asked per quote."""

    collateral: dcap_verifier.Collateral | None = None
    pccs_url: str | None = None

    @classmethod
    def chosen(cls, collateral: str | None, pccs_url: str | None) -> CollateralSource:
        """The collateral file given (read now, before the guest is asked anything: a bad
        file changes nothing), else the PCCS given, else the config file's pccs_url."""
        if collateral:
            return cls(collateral=dcap_verifier.load_collateral(collateral), pccs_url=pccs_url)
        if pccs_url:
            return cls(pccs_url=pccs_url)
        from ..config import load_config

        return cls(pccs_url=load_config().pccs_url)

    def resolve(self, raw_quote: bytes) -> tuple[dcap_verifier.Collateral | None, str]:
        if self.collateral is not None:
            return self.collateral, ""
        if self.pccs_url:
            try:
                return dcap_verifier.fetch_collateral(self.pccs_url, raw_quote), ""
            except dcap_verifier.CollateralError as error:
                return None, str(error)
        return None, NO_COLLATERAL


@dataclass(frozen=True)
class AttestReport:
    domain: str
    nonce: bytes
    checks: tuple[Check, ...]
    quote: TdQuote | None
    evidence: Evidence
    collateral: dcap_verifier.Collateral | None
    verification_time: int
    replayed_events: tuple[CcEvent, ...] | None = None  # the CCEL's events, only when they replayed

    @property
    def ok(self) -> bool:
        """No check failed, the quote's signature verified and MRTD matched the
        prediction: a quote whose signature or firmware was not checked proves nothing
        about what runs, so a script that gates keys on the exit code never passes one
        (other checks not run are listed, never counted as passed)."""
        return not self.failed and self.verified and self.firmware_matched and self.bound

    @property
    def bound(self) -> bool:
        """The quote is this TD's: its MR values and TD attributes are the ones root recorded."""
        passed = {c.name for c in self.checks if c.result == PASS}
        return all(name in passed for name in IDENTITY)

    @property
    def firmware_matched(self) -> bool:
        return any(c.name == "MRTD" and c.result == PASS for c in self.checks)

    @property
    def verified(self) -> bool:
        return any(c.name == SIGNATURE and c.result == PASS for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [check for check in self.checks if check.result == FAIL]

    @property
    def not_checked(self) -> list[Check]:
        return [check for check in self.checks if check.result == NOT_CHECKED]

    def as_dict(self) -> dict:
        return {"domain": self.domain, "ok": self.ok, "verified": self.verified, "bound": self.bound,
                "firmware_matched": self.firmware_matched,
                "nonce": self.nonce.hex(),
                "verification_time": dcap_verifier.when(self.verification_time),
                "checks": [check.as_dict() for check in self.checks],
                "quote": self.quote.as_dict() if self.quote else None,
                "collateral": self.collateral.as_dict() if self.collateral else None,
                "evidence": self.evidence.as_dict(),
                "replayed_events": None if self.replayed_events is None
                else [event.as_dict() for event in self.replayed_events]}

    def failure_message(self) -> str:
        """Why the exit code is 1, in one line."""
        if self.failed:
            names = ", ".join(check.name for check in self.failed)
            return f"TD {self.domain!r} failed attestation: {names} (see the table above)"
        if not self.verified:
            return (f"TD {self.domain!r} is not attested: the quote's signature was not verified "
                    "(see the table above); give --collateral FILE or --pccs-url URL")
        if not self.firmware_matched:
            return (f"TD {self.domain!r} is not attested: its MRTD was not compared with a prediction "
                    "(see the table above); give --firmware FILE, a copy of the TD's firmware")
        return (f"TD {self.domain!r} is not attested: no root-owned record binds the quote to this TD "
                "(its MR values and TD attributes were not compared); run `tdxvirt adopt` on its host")


def assess(name: str, nonce: bytes, evidence: Evidence, predictions: Predictions,
           source: CollateralSource, now: int | None = None) -> AttestReport:
    """Every check of the evidence; ``now`` is the verification time (default: now)."""
    now = int(time.time()) if now is None else now
    verdict, missing, collateral = None, "", None
    try:
        parse_quote(evidence.quote)
    except QuoteFormatError:
        pass  # check_quote reports it; there is nothing to verify
    else:
        collateral, missing = source.resolve(evidence.quote)
        if collateral is not None:
            verdict = dcap_verifier.verify(evidence.quote, collateral, now)
    quote, checks = check_quote(evidence.quote, nonce, predictions, verdict, missing)
    replay, events = check_event_log(evidence.event_log, evidence.event_log_note, quote)
    checks += [replay, *check_gpu(evidence.gpu)]
    return AttestReport(name, nonce, tuple(checks), quote, evidence, collateral, now, events)


def attest_guest(guest, name: str, nonce: bytes, predictions: Predictions, source: CollateralSource,
                 gpus: int | None = None, now: int | None = None) -> AttestReport:
    return assess(name, nonce, collect(guest, nonce, gpus), predictions, source, now)


def attest_domain(conn, name: str, nonce: bytes, predict, source: CollateralSource,
                  timeout: float, now: int | None = None) -> AttestReport:
    """``predict(basis)`` gives the Predictions from a tdxvirt.domain.recorded
    PredictionBasis (the CLI's: tdxvirt.domain.measure with this host's facts): root's
    record of the TD, never the paths its live XML names."""
    from dataclasses import replace

    from ..domain.domainxml import read_domain_xml
    from ..domain.recorded import prediction_basis
    from ..guest import GuestNotReadyError
    from ..guest.verify import (
        GuestExec,
        LibvirtAgentChannel,
        agent_channel_state,
        missing_agent_message,
        silent_agent_message,
    )
    from ..virt.lookup import lookup, parsable_xml

    domain = lookup(conn, name)
    name = domain.name()
    if not domain.isActive():
        raise GuestNotReadyError(f"TD {name!r} is not running; start it (`tdxvirt start {name}`), let it "
                                 "boot, then attest again")
    xml = parsable_xml(domain.XMLDesc(0))
    state = agent_channel_state(xml)
    if state is None:
        raise GuestNotReadyError(missing_agent_message(name))
    if state == "disconnected":
        raise GuestNotReadyError(silent_agent_message(name))
    basis = prediction_basis(conn.getURI(), domain.UUIDString(), xml)
    predictions = predict(basis)
    if basis.record is not None:
        predictions = replace(predictions, identity=identity_from(basis.record))
    guest = GuestExec(LibvirtAgentChannel(domain, uri=conn.getURI()), timeout=timeout, name=f"TD {name!r}")
    report = attest_guest(guest, name, nonce, predictions, source, len(read_domain_xml(xml).gpus), now)
    return replace(report, checks=(reference_check(basis), *report.checks))


def reference_check(basis) -> Check:
    """Where the predictions come from: root's record (its live definition unchanged:
    pass; changed: fail, by name), or no trusted reference (not-checked)."""
    if not basis.trusted:
        return Check("references", NOT_CHECKED, basis.source)
    if basis.differences:
        return Check("references", FAIL, "the live definition differs from root's record: "
                     + "; ".join(basis.differences) + " (predictions are the record's)")
    return Check("references", PASS, "predicted from root's record of this TD; its live "
                 "definition names the same firmware, kernel, initrd and command line")


def predictor(conn, facts, page_order: str = "single-pass", firmware: str | None = None):
    """What `guest attest` predicts a TD's measurements from: root's record's definition
    (``basis``), with files read on this host only when the URI is local and the record
    names them (never a path a libvirt user pointed elsewhere)."""
    from ..domain.measure import predict as measure
    from ..errors import InputError
    from ..virt.conn import qemu_version
    from .checks import no_predictions, predictions_from

    def predict(basis):
        def local_file(path: str):
            return None if facts.remote or not basis.trusted else str(facts.host.path(path))

        try:
            return predictions_from(measure(basis.xml, local_file, page_order, firmware_override=firmware,
                                            unread_why=None if facts.remote or basis.trusted
                                            else basis.source, qemu_version=qemu_version(conn)))
        except InputError as error:
            return no_predictions(str(error))

    return predict
