"""Attestation of a running TD: its quote fetched in the guest, parsed and checked here.

- ``evidence``: what the guest hands over through its QEMU guest agent (the TD quote
  from configfs-tsm, the CCEL event log, NVIDIA's CC mode and verifier result);
- ``quote``: the TDX quote's layout (versions 4 and 5);
- ``eventlog``: the CC event log parsed and replayed against the quote's RTMRs;
- ``dcap``: the quote's signature chain and TCB, through a DCAP verifier (dcap-qvl)
  and its collateral (a file, or a PCCS);
- ``checks``: each check with its own result (pass, fail, not-checked) and message;
- ``report``: the evidence and the checks of one TD, as ``guest attest`` prints them.
"""

from ..errors import InputError, TdxvirtError


class QuoteFormatError(TdxvirtError):
    """Bytes that are not a TDX quote (or a truncated one)."""


class EventLogFormatError(TdxvirtError):
    """Bytes that are not a CC event log (truncated, absurd lengths, no SHA-384)."""


class CollateralError(InputError):
    """Collateral that cannot be read (exit 2), or a PCCS that cannot be reached (then
    the signature check says not-checked, with this message)."""


class AttestationFailedError(TdxvirtError):
    """At least one attestation check failed (the report says which)."""
