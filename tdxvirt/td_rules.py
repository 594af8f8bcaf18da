"""What QEMU and libvirt's qemu driver demand of a TD, checked on the final XML.

libvirt's test driver (and an older libvirt's schema) accepts a TD that the qemu
driver would refuse at start, hours into a deployment. tdxvirt checks the domain XML
itself before defining or starting it. Works on any domain XML, including TDs that
other tools defined.
"""

from __future__ import annotations

from lxml import etree

from .tdx_options import POLICY_ALLOWED

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def _is_tdx(root) -> bool:
    if root.find("launchSecurity[@type='tdx']") is not None:
        return True
    args = root.xpath("q:commandline/q:arg/@value", namespaces={"q": QEMU_NS})
    return any("tdx-guest" in a for a in args)


def td_problems(xml: str) -> list[str]:
    """Each way this TD breaks TDX's rules, as a sentence; empty when it is fine."""
    root = etree.fromstring(xml.encode())
    problems = []
    if root.xpath("sysinfo[@type='fwcfg']/entry[starts-with(@name, 'opt/ovmf/')]"):
        problems.append("libvirt's qemu driver refuses opt/ovmf/ entries in <sysinfo "
                        "type='fwcfg'>; pass -fw_cfg through <qemu:commandline> instead")
    if not _is_tdx(root):
        return problems
    machine = root.find("os/type")
    if machine is None or not (machine.get("machine") or "").startswith(("q35", "pc-q35")):
        problems.append("a TD needs the q35 machine type")
    loader = root.find("os/loader")
    if loader is not None and loader.get("type") != "rom":
        problems.append("TDX firmware must be loaded as ROM (<loader type='rom'>), not pflash")
    if root.find("os/nvram") is not None:
        problems.append("a TD cannot have NVRAM (UEFI variables live in the firmware image)")
    smm = root.find("features/smm")
    if smm is not None and smm.get("state", "on") != "off":
        problems.append("a TD cannot have SMM: set <smm state='off'/>")
    pmu = root.find("features/pmu")
    if pmu is None or pmu.get("state") != "off":
        problems.append("a TD needs the PMU off: <pmu state='off'/>")
    ioapic = root.find("features/ioapic")
    args = " ".join(root.xpath("q:commandline/q:arg/@value", namespaces={"q": QEMU_NS}))
    if (ioapic is None or ioapic.get("driver") != "qemu") and "kernel_irqchip=split" not in args:
        problems.append("a TD needs the split irqchip: <ioapic driver='qemu'/>")
    policy = root.findtext("launchSecurity[@type='tdx']/policy")
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
