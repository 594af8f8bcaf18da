#!/usr/bin/python
# Copyright: tdxvirt developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module tdx_gpu: GPUs on vfio-pci or their host drivers, in CC / PPCIe mode
(tdxvirt gpu detach, reattach, cc-mode)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: tdx_gpu
short_description: NVIDIA GPUs on vfio-pci and in CC / PPCIe mode, through tdxvirt
description:
  - Binds the named GPUs (or every NVIDIA GPU, C(all)), and every endpoint of their
    IOMMU groups, to vfio-pci or back to their host drivers, as C(tdxvirt gpu detach) /
    C(reattach) do (all or nothing), and sets their CC mode or the HGX board's PPCIe mode
    with NVIDIA's gpu-admin-tools, as C(tdxvirt gpu cc-mode --set / --ppcie) do (the GPU is
    reset after a switch). Both through the tdxvirt library on the managed host.
  - Changed only when a device moved or a mode was switched; devices already where and as
    asked are left alone. Check mode is C(--dry-run) (tdxvirt's checks run, nothing moves
    or switches); diff mode shows the dry runs' lines.
  - A move or switch of a GPU a running domain holds is refused in one line.
  - Acts on the machine it runs on; a URI naming another host is refused.
version_added: "0.1.0"
author: tdxvirt developers
options:
  gpus:
    description: PCI addresses (C(38:00.0) or C(0000:38:00.0)), or C(all) for every NVIDIA
      GPU (and, for O(driver), every NVSwitch) on the host.
    type: list
    elements: str
    default: [all]
  driver:
    description: C(vfio) binds them to vfio-pci, C(host) gives them back to their host
      drivers; unset leaves the drivers alone.
    type: str
    choices: [vfio, host]
  cc_mode:
    description: CC mode to set; unset leaves it alone.
    type: str
    choices: ["on", "off", devtools]
  ppcie:
    description: PPCIe mode of the whole HGX board; exclusive with O(cc_mode).
    type: str
    choices: ["on", "off"]
  method:
    description: How O(driver) moves them, libvirt's node-device calls or sysfs.
    type: str
    choices: [libvirt, sysfs]
    default: libvirt
  force:
    description: Bind to vfio-pci even if processes use the GPU.
    type: bool
    default: false
  tool:
    description: NVIDIA's nvidia_gpu_tools (checkout, script or executable).
    type: path
  host_root:
    description: Read the GPUs below this directory instead of C(/) (C(--host-root)).
    type: path
requirements:
  - tdxvirt's C(gpu) extra (NVIDIA's gpu-admin-tools) for CC mode
extends_documentation_fragment:
  - tdxvirt.tdx.host
notes:
  - Supports check mode and diff mode.
"""

EXAMPLES = r"""
- name: Every GPU on vfio-pci and in CC mode
  tdxvirt.tdx.tdx_gpu:
    gpus: [all]
    driver: vfio
    cc_mode: "on"

- name: The HGX board in PPCIe mode
  tdxvirt.tdx.tdx_gpu:
    gpus: ["18:00.0"]
    ppcie: "on"
"""

RETURN = r"""
devices:
  description: Each device's modes after the task, as C(gpu cc-mode --json) gives them
    (address, model, kind, cc_mode, ppcie_mode, result, ok); empty without O(cc_mode) or
    O(ppcie).
  returned: always
  type: list
  elements: dict
moved:
  description: Each device moved, with the driver before and after.
  returned: always
  type: list
  elements: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.common import HOST_OPTIONS, execute, warnings


def _addresses(s, gpus, switches):
    """The addresses named, or for C(all) every NVIDIA GPU (and NVSwitch with ``switches``)."""
    if [g.strip().lower() for g in gpus] != ["all"]:
        return gpus
    from tdxvirt.errors import HostNotReadyError
    from tdxvirt.gpu import discovery
    from tdxvirt.gpu.devices import GPU, NVSWITCH

    kinds = (GPU, NVSWITCH) if switches else (GPU,)
    conn = s.conn()
    found = [r.address for r in discovery.discover(s.facts(conn), conn) if r.kind in kinds]
    if not found:
        raise HostNotReadyError("no NVIDIA GPU on this host; `tdxvirt gpu list` shows what "
                                "tdxvirt finds")
    return found


def _driver(module, s, result, diff):
    from tdxvirt.gpu import devices, privilege, vfio
    from tdxvirt.gpu.binding import LibvirtBinder, SysfsBinder
    from tdxvirt.lifecycle.gpuops import refuse_under_running_domains
    from tdxvirt.textsafe import safe

    p, check = module.params, module.check_mode
    host = s.host
    targets = devices.read_targets(host, _addresses(s, p["gpus"], True))
    binder = SysfsBinder(host, None) if p["method"] == "sysfs" else LibvirtBinder(s.conn)
    if p["driver"] == "vfio":
        plan = vfio.plan_detach(host, targets, p["force"])
    else:
        plan = vfio.plan_reattach(host, targets)
    if all(move.noop for move in plan.moves):
        return
    if not check:
        privilege.require_root("tdx_gpu driver", privilege.CHANGES_DRIVERS, dry_run_hint=False)
    if plan.action == vfio.REATTACH:
        note = refuse_under_running_domains(s.conn, host, targets, "a reattach", groups=True)
        warnings(module, [note] if note else [])
    diff.append("\n".join(safe(line) for line in vfio.dry_run(plan, binder)) + "\n")
    if not check:
        outcomes = vfio.apply(plan, binder, host)
        result["moved"] = [dict(address=o.address, label=o.label, before=o.before,
                                after=o.after, result=o.result) for o in outcomes]
    result["changed"] = True


def _modes(module, s, result, diff):
    from tdxvirt.errors import HostNotReadyError
    from tdxvirt.gpu import admin_tool, ccmode, privilege
    from tdxvirt.lifecycle.gpuops import (
        check_mode_request,
        mode_dry_run_lines,
        mode_targets,
        refuse_under_running_domains,
    )

    p, check = module.params, module.check_mode
    cc, ppcie = p["cc_mode"], p["ppcie"]
    check_mode_request(cc, ppcie)
    host = s.host
    targets, _ = mode_targets(host, _addresses(s, p["gpus"], False), cc, ppcie)
    privilege.require_root("tdx_gpu cc_mode / ppcie", privilege.READS_REGISTERS,
                           dry_run_hint=False)
    tool = admin_tool.locate(p["tool"], host)
    now = ccmode.query(tool, targets, bool(ppcie) or ccmode.has_nvswitches(host))
    unread = [r for r in now if not r.ok]
    if unread:
        raise HostNotReadyError("cannot read the mode of %s: %s; nothing was changed" % (
            unread[0].address, unread[0].result.removeprefix("FAILED: ")))
    result["devices"] = [r.__dict__ for r in now]
    if all((r.ppcie_mode if ppcie else r.cc_mode) == (ppcie or cc) for r in now):
        return
    setting = ppcie or cc
    refuse_under_running_domains(s.conn, host, targets, "a mode switch (with its reset)",
                                 groups=False)
    diff.append("\n".join(mode_dry_run_lines(host, tool, targets, setting, bool(ppcie))) + "\n")
    if not check:
        if ppcie:
            done = ccmode.set_ppcie(host, tool, targets, ppcie)
        else:
            done = ccmode.set_cc(host, tool, targets, cc)
            mixed = ccmode.mixed_board(host, tool, targets, cc)
            warnings(module, [mixed] if mixed else [])
        result["devices"] = [r.__dict__ for r in done]
    result["changed"] = True


def run(module, s, result, diff):
    from tdxvirt.cli.gpu import _this_machine_only

    p = module.params
    _this_machine_only(s, "tdx_gpu")
    if p["driver"]:
        _driver(module, s, result, diff)
    if p["cc_mode"] or p["ppcie"]:
        _modes(module, s, result, diff)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            gpus=dict(type="list", elements="str", default=["all"]),
            driver=dict(type="str", choices=["vfio", "host"]),
            cc_mode=dict(type="str", choices=["on", "off", "devtools"]),
            ppcie=dict(type="str", choices=["on", "off"]),
            method=dict(type="str", default="libvirt", choices=["libvirt", "sysfs"]),
            force=dict(type="bool", default=False),
            tool=dict(type="path"),
            **HOST_OPTIONS
        ),
        supports_check_mode=True,
    )
    result = dict(changed=False, devices=[], moved=[])
    diff = []
    execute(module, run, result, diff, lambda collected: dict(prepared="".join(collected)))


if __name__ == "__main__":
    main()
