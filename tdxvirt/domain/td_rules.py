"""What QEMU and libvirt's qemu driver demand of a TD, checked on the final XML.

libvirt's test driver (and an older libvirt's schema) accepts a TD that the qemu
driver would refuse at start, hours into a deployment. tdxvirt checks the domain XML
itself before defining or starting it. Works on any domain XML, including TDs that
other tools defined.
"""

from __future__ import annotations

from .domainxml import DomainXML
from .tdx_options import POLICY_ALLOWED


def td_problems(xml) -> list[str]:
    """Each way this TD breaks TDX's rules, as a sentence; empty when it is fine."""
    domain = DomainXML.of(xml)
    problems = []
    if any(name.startswith("opt/ovmf/") for name in domain.fwcfg_sysinfo_names()):
        problems.append("libvirt's qemu driver refuses opt/ovmf/ entries in <sysinfo "
                        "type='fwcfg'>; pass -fw_cfg through <qemu:commandline> instead")
    if domain.launch is None and not domain.has_tdx_object():
        return problems
    machine = domain.os_child("type")
    if machine is None or not (machine.get("machine") or "").startswith(("q35", "pc-q35")):
        problems.append("a TD needs the q35 machine type")
    loader = domain.os_child("loader")
    if loader is not None and loader.get("type") != "rom":
        problems.append("TDX firmware must be loaded as ROM (<loader type='rom'>), not pflash")
    if domain.os_child("nvram") is not None:
        problems.append("a TD cannot have NVRAM (UEFI variables live in the firmware image)")
    smm = domain.feature("smm")
    if smm is not None and smm.get("state", "on") != "off":
        problems.append("a TD cannot have SMM: set <smm state='off'/>")
    pmu = domain.feature("pmu")
    if pmu is None or pmu.get("state") != "off":
        problems.append("a TD needs the PMU off: <pmu state='off'/>")
    ioapic = domain.feature("ioapic")
    if (ioapic is None or ioapic.get("driver") != "qemu") and not any(
            "kernel_irqchip=split" in a for a in domain.qemu_args):
        problems.append("a TD needs the split irqchip: <ioapic driver='qemu'/>")
    policy = None if domain.launch is None else domain.launch.findtext("policy")
    if policy is not None:
        try:
            value = int(policy.strip().removeprefix("0x"), 16)
        except ValueError:
            problems.append(f"TDX policy {policy!r} is not a hex number")
        else:
            if value & ~POLICY_ALLOWED:
                problems.append(f"TDX policy {policy} sets bits libvirt does not allow "
                                "(only 0x1 debug and 0x10000000 SEPT #VE disable)")
    return problems
