#!/usr/bin/python
# Copyright: tdxvirt developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module tdx_attest: tdxvirt guest attest, failing the task unless it passes."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: tdx_attest
short_description: Attest a running TD (tdxvirt guest attest); the task fails unless it passes
description:
  - Asks the running TD for a TD quote through its guest agent and configfs-tsm, with 64
    fresh random bytes as REPORTDATA, and checks it on the managed host as
    C(tdxvirt guest attest) does (the same library function) - format, nonce, debug bit,
    MRTD and RTMRs against their predictions, the signature chain and TCB with dcap-qvl,
    the GPU's CC mode and NVIDIA verifier result as the guest reports them.
  - The task fails, with tdxvirt's one line in msg, unless every check passed, the quote's
    signature verified and MRTD matched the prediction (tdxvirt's exit 0). It changes
    nothing, in check mode or not (check mode attests too).
version_added: "0.1.0"
author: tdxvirt developers
options:
  name:
    description: The TD (name or UUID).
    type: str
    required: true
  collateral:
    description: Verify the quote's signature offline with this collateral (dcap-qvl's JSON).
    type: path
  pccs_url:
    description: Fetch the collateral from this PCCS (default pccs_url in tdxvirt's config).
    type: str
  firmware:
    description: The TD's firmware image as a file here, for the MRTD prediction (remote
      hosts).
    type: path
  page_order:
    description: How the host adds firmware pages, for the MRTD prediction.
    type: str
    choices: [single-pass, two-pass]
    default: single-pass
  timeout:
    description: Seconds to wait for each command in the guest.
    type: float
    default: 60
extends_documentation_fragment:
  - tdxvirt.tdx.host
notes:
  - Supports check mode (it changes nothing either way).
"""

EXAMPLES = r"""
- name: The TD is what it should be, or the play stops here
  tdxvirt.tdx.tdx_attest:
    name: td1
    collateral: /etc/tdxvirt/collateral.json
  register: attestation
"""

RETURN = r"""
attestation:
  description: C(guest attest --json)'s object (checks, nonce, collateral, evidence, ...),
    also when the task fails on a check.
  returned: when the guest answered
  type: dict
"""

import secrets

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.common import HOST_OPTIONS, fail, session


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            collateral=dict(type="path"),
            pccs_url=dict(type="str"),
            firmware=dict(type="path"),
            page_order=dict(type="str", default="single-pass", choices=["single-pass", "two-pass"]),
            timeout=dict(type="float", default=60),
            **HOST_OPTIONS
        ),
        supports_check_mode=True,
    )
    p = module.params
    result = dict(changed=False)
    s = session(module)
    try:
        from tdxvirt.attest import AttestationFailedError
        from tdxvirt.attest.report import CollateralSource, attest_domain, predictor
        from tdxvirt.errors import InputError

        if p["pccs_url"] is not None and not p["pccs_url"].startswith(("https://", "http://")):
            raise InputError("give the PCCS as an http(s):// URL, e.g. https://pccs.example:8081")
        source = CollateralSource.chosen(p["collateral"], p["pccs_url"])
        conn = s.conn()
        facts = s.facts(conn)
        report = attest_domain(conn, p["name"], secrets.token_bytes(64),
                               predictor(conn, facts, p["page_order"], p["firmware"]), source,
                               p["timeout"])
        result["attestation"] = report.as_dict()
        if not report.ok:
            raise AttestationFailedError(report.failure_message())
    except Exception as error:
        fail(module, error, **result)
    finally:
        s.close()
    module.exit_json(**result)


if __name__ == "__main__":
    main()
