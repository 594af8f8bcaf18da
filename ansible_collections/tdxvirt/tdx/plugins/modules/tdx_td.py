#!/usr/bin/python
# Copyright: tdxvirt developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module tdx_td: a TD present, running, stopped or absent (tdxvirt define,
start, stop, repair, destroy, undefine)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: tdx_td
short_description: An Intel TDX trust domain (TD) with GPUs, defined and driven by tdxvirt
description:
  - Makes the TD C(name) present (defined), running, stopped or absent on the host the
    libvirt URI names, through the tdxvirt library's define, start, stop, repair,
    destroy and undefine (the same functions as C(tdxvirt define), C(start), ...).
  - An existing TD that another tool weakened (launch security, firmware, MMIO window, ...)
    is repaired from root's record of it, as C(tdxvirt repair) does, and the task reports
    changed with the repair's diff.
  - An existing TD defined with other vCPUs, memory, GPUs, policy, MR values, direct-boot
    kernel, initrd, arguments or firmware than the task asks for fails the task in one line;
    tdxvirt does not redefine a TD in place (C(state=absent) first). Its disk image is not
    compared.
  - Check mode runs tdxvirt's dry runs (every define check, the repair plan) and changes
    nothing; diff mode shows the XML define would define, with the files it would
    create, or the repair's diff of the definition.
  - Needs the tdxvirt library on the managed host; set C(ansible_python_interpreter) to the
    Python that has it.
version_added: "0.1.0"
author: tdxvirt developers
options:
  name:
    description: The TD's name.
    type: str
    required: true
  state:
    description:
      - C(present) defines it (repairing it when it drifted), C(running) also starts it
        (after tdxvirt's preflight), C(stopped) defines it and shuts it down (ACPI, then
        with O(force) destroys it), C(absent) powers it off at once and undefines it.
    type: str
    choices: [present, running, stopped, absent]
    default: present
  gpus:
    description: GPUs to pass through (C(38:00.0) or C(0000:38:00.0)).
    type: list
    elements: str
    default: []
  vcpus:
    description: Number of vCPUs.
    type: int
    default: 4
  memory:
    description: Memory, a number with K, M, G or T (bare number is MiB), 2 MiB aligned.
    type: str
    default: 16G
  image:
    description: Base image; the TD boots a new qcow2 overlay tdxvirt creates on it.
    type: path
  image_format:
    description: Format of O(image) (default raw, never guessed).
    type: str
    choices: [raw, qcow2]
  disk:
    description: Boot disk used as is.
    type: path
  disk_format:
    description: Format of O(disk) (default raw, never guessed).
    type: str
    choices: [raw, qcow2]
  kernel:
    description: Direct kernel boot, the guest kernel.
    type: path
  initrd:
    description: Direct kernel boot, the initrd.
    type: path
  cmdline:
    description: Direct kernel boot, kernel arguments (C(clearcpuid=mtrr) is added).
    type: str
  ovmf:
    description: TDX OVMF (default from tdxvirt's config, else QEMU's firmware descriptors).
    type: path
  policy:
    description: TD policy as hex (default C(0x10000000); bits 0 and 28 only).
    type: str
  debug:
    description: Set the debug policy bit (never in production).
    type: bool
    default: false
  mr_config_id:
    description: MRCONFIGID, base64 of 48 bytes.
    type: str
  mr_owner:
    description: MROWNER, base64 of 48 bytes.
    type: str
  mr_owner_config:
    description: MROWNERCONFIG, base64 of 48 bytes.
    type: str
  network:
    description: The NIC as virt-install spells it (default, network=NAME, bridge=BR, user,
      none); C(auto) is libvirt's default network where the host has it, else none.
    type: str
    default: auto
  ssh_keys:
    description: Public key files for the guest user (a cloud-init seed).
    type: list
    elements: path
    default: []
  managed:
    description: Let libvirt bind the GPUs to vfio-pci at start.
    type: bool
    default: true
  allow_shared:
    description: Allow a GPU another defined domain passes through.
    type: bool
    default: false
  mmio_window:
    description: 64-bit MMIO window (e.g. C(256G)); default sized from the GPUs' BARs.
    type: str
  tdx:
    description: False defines the same VM without TDX (plain mode).
    type: bool
    default: true
  remove_storage:
    description: With C(state=absent), also delete the overlay and seed tdxvirt created
      (never a base image).
    type: bool
    default: true
  stop_timeout:
    description: Seconds C(state=stopped) waits for the guest to power off.
    type: float
    default: 120
  force:
    description: With C(state=stopped), destroy a TD that did not power off in time.
    type: bool
    default: false
  gpu_tool:
    description: NVIDIA's gpu-admin-tools start's preflight reads CC modes with.
    type: path
extends_documentation_fragment:
  - tdxvirt.tdx.host
notes:
  - Supports check mode and diff mode.
"""

EXAMPLES = r"""
- name: A TD with the H100 at 38:00.0, running
  tdxvirt.tdx.tdx_td:
    name: td1
    gpus: ["38:00.0"]
    memory: 64G
    vcpus: 16
    image: /var/lib/libvirt/images/base.qcow2
    image_format: qcow2
    ssh_keys: [/root/.ssh/id_ed25519.pub]
    state: running

- name: Gone, with the overlay tdxvirt made
  tdxvirt.tdx.tdx_td:
    name: td1
    state: absent
"""

RETURN = r"""
name:
  description: The TD's name.
  returned: always
  type: str
state:
  description: Its state after the task (virsh's words, or C(absent)); in check mode the
    state it would have.
  returned: always
  type: str
  sample: running
uuid:
  description: Its UUID (null when absent, or not yet defined in check mode).
  returned: always
  type: str
defined:
  description: The task defined it (would define it, in check mode).
  returned: always
  type: bool
repaired:
  description: What the repair changed (would change), as C(tdxvirt repair) lists it.
  returned: always
  type: list
  elements: str
removed:
  description: Files undefine removed (would remove).
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.common import HOST_OPTIONS, execute, warnings

SPEC_OPTIONS = ("gpus", "vcpus", "memory", "image", "image_format", "disk", "disk_format",
                "kernel", "initrd", "cmdline", "ovmf", "policy", "debug", "mr_config_id",
                "mr_owner", "mr_owner_config", "network", "managed", "allow_shared",
                "mmio_window")


def _spec(params, remote):
    from tdxvirt.domain.spec import TDSpec

    options = {key: params[key] for key in SPEC_OPTIONS}
    options["gpus"] = tuple(options["gpus"])
    return TDSpec.from_user(name=params["name"], tdx=params["tdx"], remote=remote,
                            ssh_key=tuple(params["ssh_keys"]), **options)


# What a TD's launch is made of beyond its size and GPUs: each, as text in the domain XML,
# compared between the XML the task's options render and the XML libvirt holds.
LAUNCH_FIELDS = (("policy", "launchSecurity/policy"), ("MRCONFIGID", "launchSecurity/mrConfigId"),
                 ("MROWNER", "launchSecurity/mrOwner"),
                 ("MROWNERCONFIG", "launchSecurity/mrOwnerConfig"), ("kernel", "os/kernel"),
                 ("initrd", "os/initrd"), ("kernel arguments", "os/cmdline"),
                 ("firmware", "os/loader"))


def _launch_mismatch(wanted_xml, defined_xml):
    """How the defined TD's launch (policy, MR values, direct-boot files, firmware)
    differs from what the task's options render."""
    from lxml import etree

    wanted, defined = (etree.fromstring(x.encode()) for x in (wanted_xml, defined_xml))
    differences = []
    for label, path in LAUNCH_FIELDS:
        want = (wanted.findtext(path) or "").strip()
        have = (defined.findtext(path) or "").strip()
        if label == "firmware" and not want:
            continue  # libvirt's own pick on the host: nothing asked for
        if want != have:
            differences.append("%s %s, not %s" % (label, have or "none", want or "none"))
    return differences


def _mismatch(spec, facts):
    """How the defined TD differs from what the task asks for (vCPUs, memory, GPUs)."""
    from tdxvirt.units import MIB

    asked_mib = -(-spec.memory // (2 * MIB)) * 2  # define rounds up to 2 MiB
    asked = [str(g) for g in spec.gpus]
    differences = []
    if facts.vcpus != spec.vcpus:
        differences.append("%d vCPUs, not %d" % (facts.vcpus, spec.vcpus))
    if facts.memory_kib // 1024 != asked_mib:
        differences.append("%d MiB, not %d" % (facts.memory_kib // 1024, asked_mib))
    if sorted(facts.gpus) != sorted(asked):
        differences.append("GPUs %s, not %s" % (" ".join(facts.gpus) or "none",
                                                " ".join(asked) or "none"))
    return differences


def _refuse_redefining(module, result, differences):
    from tdxvirt.textsafe import quoted

    if differences:
        module.fail_json(
            msg="%s is defined with %s; tdxvirt does not redefine a TD in place: remove it "
                "first (state: absent), then define it again" % (quoted(module.params["name"]),
                                                                ", ".join(differences)),
            **result)


def run(module, s, result, diff):
    from tdxvirt.cli import define_dry_run_lines
    from tdxvirt.errors import NotFoundError
    from tdxvirt.lifecycle import tds
    from tdxvirt.lifecycle.repair import repair_td
    from tdxvirt.textsafe import quoted
    from tdxvirt.virt.conn import is_remote

    p, check = module.params, module.check_mode
    conn = s.conn()
    facts = s.facts(conn)
    try:
        domain = tds.lookup(conn, p["name"])
    except NotFoundError:
        domain = None

    if p["state"] == "absent":
        if domain is None:
            result["state"] = "absent"
            return
        result["uuid"] = domain.UUIDString()
        diff["before"] = tds.domain_xml(conn, domain.UUIDString(), inactive=True)
        diff["after"] = ""
        result["changed"] = True
        running = bool(domain.isActive())
        if running and not check:
            tds.destroy(conn, domain)
        if not (check and running):  # undefine's dry run refuses a running TD
            result["removed"] = tds.undefine(conn, domain, remove_storage=p["remove_storage"],
                                             dry_run=check)
        result["state"] = "absent"
        return

    spec = _spec(p, is_remote(s.uri))
    if domain is None:
        result["changed"] = result["defined"] = True
        if check:
            td = tds.assemble_td(conn, facts, spec)
            diff["prepared"] = td.xml + "\n".join(define_dry_run_lines(td.plan, s.uri)) + "\n"
        else:
            warnings(module, tds.recover_interrupted(conn))
            td = tds.define_td(conn, facts, spec)
            diff["prepared"] = td.xml
            domain = tds.lookup(conn, p["name"])
        warnings(module, td.plan.warnings)
        result["uuid"] = td.plan.uuid
    else:
        result["uuid"] = domain.UUIDString()
        defined_xml = tds.domain_xml(conn, domain.UUIDString(), inactive=True)
        _refuse_redefining(module, result, _mismatch(spec, tds.read_facts(defined_xml)))
        repair = repair_td(conn, facts, domain.UUIDString(), dry_run=check)
        if not (repair.is_td and repair.needed):  # a weakened TD's launch is repair's to restore
            wanted = tds.assemble_td(conn, facts, spec, check_schema=False).xml
            _refuse_redefining(module, result, _launch_mismatch(wanted, defined_xml))
        if repair.is_td and repair.needed:
            result["changed"] = True
            result["repaired"] = list(repair.changes) + (
                ["remove the managed-save image"] if repair.remove_managed_save else [])
            if repair.changes:
                diff["prepared"] = repair.diff() + "\n"
            if repair.running:
                module.warn("%s is running: the repair takes effect when it is next started"
                            % quoted(p["name"]))

    active = domain is not None and bool(domain.isActive())
    if p["state"] == "running":
        if not active:
            if not check:
                tds.start(conn, facts, domain, read_modes=facts.mode_reader(p["gpu_tool"]))
            result["changed"] = True
        result["state"] = "running"
    elif p["state"] == "stopped":
        if active:
            if not check:
                tds.stop_or_destroy(conn, domain, p["stop_timeout"], p["force"])
            result["changed"] = True
        result["state"] = "shut off"
    else:
        result["state"] = ("running" if active else "shut off") if domain is not None \
            else "shut off"


def main():
    argument_spec = dict(
        name=dict(type="str", required=True),
        state=dict(type="str", default="present",
                   choices=["present", "running", "stopped", "absent"]),
        gpus=dict(type="list", elements="str", default=[]),
        vcpus=dict(type="int", default=4),
        memory=dict(type="str", default="16G"),
        image=dict(type="path"),
        image_format=dict(type="str", choices=["raw", "qcow2"]),
        disk=dict(type="path"),
        disk_format=dict(type="str", choices=["raw", "qcow2"]),
        kernel=dict(type="path"),
        initrd=dict(type="path"),
        cmdline=dict(type="str"),
        ovmf=dict(type="path"),
        policy=dict(type="str"),
        debug=dict(type="bool", default=False),
        mr_config_id=dict(type="str"),
        mr_owner=dict(type="str"),
        mr_owner_config=dict(type="str"),
        network=dict(type="str", default="auto"),
        ssh_keys=dict(type="list", elements="path", default=[], no_log=False),
        managed=dict(type="bool", default=True),
        allow_shared=dict(type="bool", default=False),
        mmio_window=dict(type="str"),
        tdx=dict(type="bool", default=True),
        remove_storage=dict(type="bool", default=True),
        stop_timeout=dict(type="float", default=120),
        force=dict(type="bool", default=False),
        gpu_tool=dict(type="path"),
        **HOST_OPTIONS
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True,
                           mutually_exclusive=[("image", "disk")])
    result = dict(changed=False, name=module.params["name"], state=None, uuid=None,
                  defined=False, repaired=[], removed=[])
    diff = {}
    execute(module, run, result, diff)


if __name__ == "__main__":
    main()
