#!/usr/bin/python
# Copyright: tdxvirt developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module tdx_facts: tdxvirt's host check, gpu list and list as facts."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: tdx_facts
short_description: tdxvirt's host check, GPU list and TD list as facts
description:
  - Reads, through the tdxvirt library, what C(tdxvirt host check --json),
    C(tdxvirt gpu list --json) and C(tdxvirt list --json) print, and returns them as the
    facts C(tdxvirt_host), C(tdxvirt_gpus) and C(tdxvirt_tds), with the same keys
    (tdxvirt's docs/json.md, schema version 1). Changes nothing.
  - Needs the tdxvirt library on the managed host; set C(ansible_python_interpreter) to the
    Python that has it.
version_added: "0.1.0"
author: tdxvirt developers
options:
  gather:
    description: Which facts to read.
    type: list
    elements: str
    choices: [host, gpus, tds]
    default: [host, gpus, tds]
  for_gpus:
    description: The host check checks these GPUs (default every NVIDIA GPU).
    type: list
    elements: str
    default: []
  foreign:
    description: Also list TDX domains other tools defined.
    type: bool
    default: false
  fail_on_check:
    description: Fail the task when a host check failed (as C(host check) exits 1).
    type: bool
    default: false
extends_documentation_fragment:
  - tdxvirt.tdx.host
notes:
  - Supports check mode (it changes nothing either way).
"""

EXAMPLES = r"""
- name: What the host has and lacks
  tdxvirt.tdx.tdx_facts:

- name: Every check passed
  ansible.builtin.assert:
    that: not ansible_facts.tdxvirt_host.failed
    fail_msg: >-
      {{ ansible_facts.tdxvirt_host.checks | selectattr('status', 'eq', 'fail')
         | map(attribute='remedy') | list }}
"""

RETURN = r"""
ansible_facts:
  description: The facts.
  returned: always
  type: complex
  contains:
    tdxvirt_host:
      description: C(host check --json)'s object (uri, host_root, failed, checks).
      returned: when gathered
      type: dict
    tdxvirt_gpus:
      description: C(gpu list --json)'s array, one object per GPU or NVSwitch.
      returned: when gathered
      type: list
      elements: dict
    tdxvirt_tds:
      description: C(list --json)'s array, one object per TD.
      returned: when gathered
      type: list
      elements: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.common import HOST_OPTIONS, fail, session, warnings


def run(module, s):
    p = module.params
    found = {}
    conn = s.conn()
    if "host" in p["gather"]:
        from tdxvirt.cli.host import _report, _run_checks
        from tdxvirt.pci import PciAddress

        addresses = tuple(PciAddress.parse(gpu) for gpu in p["for_gpus"])
        found["tdxvirt_host"] = _report(s, _run_checks(s, addresses, s.conn))
    if "gpus" in p["gather"]:
        from tdxvirt.gpu import discovery

        found["tdxvirt_gpus"] = [r.to_json() for r in discovery.discover(s.facts(conn), conn)]
    if "tds" in p["gather"]:
        from tdxvirt.cli import _records
        from tdxvirt.lifecycle import tds

        found["tdxvirt_tds"] = _records(tds.list_tds(conn, include_foreign=p["foreign"]))
    return found


def main():
    module = AnsibleModule(
        argument_spec=dict(
            gather=dict(type="list", elements="str", choices=["host", "gpus", "tds"],
                        default=["host", "gpus", "tds"]),
            for_gpus=dict(type="list", elements="str", default=[]),
            foreign=dict(type="bool", default=False),
            fail_on_check=dict(type="bool", default=False),
            **HOST_OPTIONS
        ),
        supports_check_mode=True,
    )
    s = session(module)
    try:
        found = run(module, s)
    except Exception as error:
        fail(module, error)
    finally:
        s.close()
    report = found.get("tdxvirt_host")
    failing = [c for c in report["checks"] if c["status"] == "fail"] if report else []
    if failing and module.params["fail_on_check"]:
        first = failing[0]
        module.fail_json(msg="%d host check(s) failed, first %s: %s; %s" % (
            len(failing), first["name"], first["found"], first["remedy"]), ansible_facts=found)
    if report:
        warnings(module, ["host check %s: %s" % (c["name"], c["found"])
                          for c in report["checks"] if c["status"] == "warn"])
    module.exit_json(changed=False, ansible_facts=found)


if __name__ == "__main__":
    main()
