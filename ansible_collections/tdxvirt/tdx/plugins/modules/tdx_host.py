#!/usr/bin/python
# Copyright: tdxvirt developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module tdx_host: tdxvirt host setup and its revert."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: tdx_host
short_description: Set a host up for TDs with GPUs (tdxvirt host setup), or revert it
description:
  - C(state=present) runs tdxvirt's host setup on the managed host through the tdxvirt
    library (the functions C(tdxvirt host setup) calls) - kernel arguments, modprobe.d,
    qemu.conf, libvirt's hook, then the commands they need (the boot loader's update,
    libvirtd's restart). C(state=absent) restores what setup changed from its backups
    (C(host setup --revert)).
  - Changed only when a file or command was needed. Check mode is C(--dry-run); diff mode
    shows every step as C(--dry-run) prints it (the files' unified diffs, the commands).
  - Returns whether a reboot is needed for the changes to take effect.
  - The host is the managed host itself; a remote libvirt URI is refused (run it there).
  - Needs the tdxvirt library on the managed host; set C(ansible_python_interpreter) to the
    Python that has it.
version_added: "0.1.0"
author: tdxvirt developers
options:
  state:
    description: C(present) sets the host up; C(absent) reverts setup from its backups.
    type: str
    choices: [present, absent]
    default: present
  user:
    description: User QEMU runs as (default as configured, else the distribution's).
    type: str
  group:
    description: Group QEMU runs as (default likewise).
    type: str
  security_driver:
    description: C(none) turns sVirt off (Intel's setup); C(keep) keeps it and installs udev
      rules for the VFIO devices.
    type: str
    choices: [none, keep]
    default: none
  legacy_vfio:
    description: Also raise vfio_iommu_type1's dma_entry_limit (libvirt < 12.1).
    type: bool
    default: false
  run_below_root:
    description: With a O(host_root) other than C(/), run that tree's own programs inside it
      (C(--run-below-root)); the tree must be root's alone.
    type: bool
    default: false
  uri:
    description: libvirt URI (a URI naming another host is refused).
    type: str
  host_root:
    description: Set up the host tree below this directory instead of C(/) (C(--host-root)).
    type: path
extends_documentation_fragment:
  - tdxvirt.tdx.host
notes:
  - Supports check mode and diff mode.
  - Applying restarts libvirtd when qemu.conf changed; TDs keep running.
"""

EXAMPLES = r"""
- name: Set the host up
  tdxvirt.tdx.tdx_host:
  register: setup

- name: Reboot when the kernel arguments changed
  ansible.builtin.reboot:
  when: setup.reboot_required
"""

RETURN = r"""
reboot_required:
  description: A reboot is needed for the changes (kernel arguments, kvm_intel's options)
    to take effect.
  returned: always
  type: bool
steps:
  description: One line per step done (would be done in check mode), as tdxvirt describes it.
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.common import HOST_OPTIONS, execute, warnings


def run(module, s, result, diff):
    from tdxvirt.hostcfg import setup as host_setup
    from tdxvirt.hostcfg.plan import describe, render

    p, check = module.params, module.check_mode
    host_setup.require_local(s.uri)
    host_setup.check_privileges(check)
    root = s.host
    runner = host_setup.runner_for(root, check, p["run_below_root"])
    done = []
    if p["state"] == "absent":
        plan = host_setup.revert(root, runner, done.append, dry_run=check)
    else:
        options = host_setup.SetupOptions(user=p["user"], group=p["group"],
                                          security_driver=p["security_driver"],
                                          legacy_vfio=p["legacy_vfio"])
        plan = host_setup.setup(root, runner, options, done.append, dry_run=check)
    result["changed"] = bool(plan.changes)
    result["steps"] = [describe(step) for step in plan.steps]
    result["reboot_required"] = any(n.kind == "reboot" for n in plan.notices)
    if plan.changes:
        diff["prepared"] = render(plan)
    warnings(module, [n.text for n in plan.notices if n.kind == "warning"])
    cannot = [n.text for n in plan.notices if n.kind == "cannot"]
    if cannot:
        module.fail_json(msg="%d step(s) could not be done: %s" % (len(cannot), "; ".join(cannot)),
                         diff=diff, **result)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", default="present", choices=["present", "absent"]),
            user=dict(type="str"),
            group=dict(type="str"),
            security_driver=dict(type="str", default="none", choices=["none", "keep"]),
            legacy_vfio=dict(type="bool", default=False),
            run_below_root=dict(type="bool", default=False),
            **HOST_OPTIONS
        ),
        supports_check_mode=True,
    )
    p = module.params
    if p["state"] == "absent" and (p["user"] or p["group"] or p["legacy_vfio"]
                                   or p["security_driver"] != "none"):
        module.fail_json(msg="state absent takes no other setup options (it restores the backups)")
    result = dict(changed=False, reboot_required=False, steps=[])
    diff = {}
    execute(module, run, result, diff)


if __name__ == "__main__":
    main()
