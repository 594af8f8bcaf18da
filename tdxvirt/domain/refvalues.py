"""Reference values for a relying party's verifier, from what ``measure`` predicts.

The format is Trustee's (confidential-containers/trustee): its Reference Value Provider
Service (RVPS) takes a message ``{"version": "0.1.0", "type": "sample", "payload":
base64(JSON {name: [values]})}`` (rvps/README.md, rvps/src/extractors/sample), and its
attestation service's default TDX policy (attestation-service/src/ear_token/
ear_default_policy_cpu.rego) compares the quote against the names used here: ``mr_td``,
``rtmr_1``, ``rtmr_2``, ``tdvfkernel`` (the kernel's EV_EFI_BOOT_SERVICES_APPLICATION
digest) and ``tdvfkernelparams`` (the LOADED_IMAGE::LoadOptions digest), as lower-case
hex. Trustee is chosen over Intel Trust Authority because it is the verifier people run
themselves (Confidential Containers, KBS) and it takes reference values from a file, with
no account; ITA's policies are written in its own portal.

Only predictions are exported: a register tdxvirt does not predict (RTMR0, XFAM, a
disk-booted TD's RTMR1/RTMR2) is left out and named, never guessed.
"""

from __future__ import annotations

import base64
import json

from .measure import Measurements, is_prediction

TRUSTEE_MESSAGE_VERSION = "0.1.0"


def trustee_values(result: Measurements) -> tuple[dict[str, list[str]], list[str]]:
    """({reference value name: [hex]}, what is left out and why)."""
    values: dict[str, list[str]] = {}
    left_out = []
    if result.mrtd:
        values["mr_td"] = [result.mrtd]
    else:
        left_out.append(f"mr_td: {result.unknown or 'not predicted'}")
    for register in ("rtmr1", "rtmr2"):
        value = getattr(result, register)
        if is_prediction(value):
            values[f"rtmr_{register[-1]}"] = [value]
        else:
            left_out.append(f"rtmr_{register[-1]}: {value}")
    for event in result.rtmr_events:
        if event["type"] == "EV_EFI_BOOT_SERVICES_APPLICATION" and event["register"] == "RTMR1":
            values["tdvfkernel"] = [event["digest"]]
        if event["what"].startswith("LOADED_IMAGE::LoadOptions"):
            values["tdvfkernelparams"] = [event["digest"]]
    left_out.append("xfam: follows the host CPU's features under host-passthrough; not predicted")
    return values, left_out


def trustee_message(values: dict[str, list[str]]) -> dict:
    """The RVPS message registering ``values`` (the sample provenance type)."""
    payload = json.dumps(values, indent=1, sort_keys=True).encode()
    return {"version": TRUSTEE_MESSAGE_VERSION, "type": "sample",
            "payload": base64.b64encode(payload).decode()}
