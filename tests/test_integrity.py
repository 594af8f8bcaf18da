"""A TD stays a TD: edits by the tools users run are found, untouched TDs are clean."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
import uuid

import libvirt
import pytest
from conftest import run_sim
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree
from scenarios import plan_for, scenarios

from tdxvirt.domain.integrity import problems
from tdxvirt.domain.render import render_domain

SCENARIOS = {s.name: s for s in scenarios()}
TDS = sorted(name for name, s in SCENARIOS.items() if s.dialect != "plain")


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_golden_domain_is_clean(name, tmp_path):
    """Against root's record of it (the qemu-args scenario asks for debug, which only a
    record makes legitimate)."""
    from tdxvirt.domain.recorded import record_from

    scenario = SCENARIOS[name]
    _, plan = plan_for(scenario, tmp_path / "root")
    xml = render_domain(plan)
    assert problems(xml, libvirt_version=scenario.libvirt_version,
                    window_needed_mib=lambda _: plan.mmio_mb,
                    record=record_from(xml, str(uuid.uuid4())) if plan.tdx else None) == []


# Each element (or attribute) whose loss or change weakens or breaks a TD.
WEAKENINGS = {
    "launchSecurity": lambda r: r.remove(r.find("launchSecurity")),
    "loader": lambda r: r.find("os").remove(r.find("os/loader")),
    "loader pflash": lambda r: r.find("os/loader").set("type", "pflash"),
    "nvram": lambda r: etree.SubElement(r.find("os"), "nvram"),
    "ioapic": lambda r: r.find("features").remove(r.find("features/ioapic")),
    "smm": lambda r: r.find("features/smm").set("state", "on"),
    "smm removed": lambda r: r.find("features").remove(r.find("features/smm")),
    "pmu": lambda r: r.find("features/pmu").set("state", "on"),
    "shared memory": lambda r: etree.SubElement(r.find("memoryBacking"), "access", mode="shared"),
    "hugepages": lambda r: etree.SubElement(r.find("memoryBacking"), "hugepages"),
    "policy": lambda r: setattr(r.find("launchSecurity/policy"), "text", "0x10000002"),
    "window": lambda r: r.remove(r.find("{http://libvirt.org/schemas/domain/qemu/1.0}commandline")),
    "iommufd": lambda r: r.find("devices/hostdev").remove(r.find("devices/hostdev/driver")),
    # a later -machine wins in QEMU: this one would replace libvirt's TDX launch security
    "support override": lambda r: [etree.SubElement(
        r.find(f"{{{QEMU}}}commandline"), f"{{{QEMU}}}arg", value=v)
        for v in ("-machine", "confidential-guest-support=")],
}
QEMU = "http://libvirt.org/schemas/domain/qemu/1.0"


def weaken(root, edits, table=WEAKENINGS) -> None:
    """Apply the named edits of ``table`` to a domain's root, in order."""
    for edit in edits:
        try:
            table[edit](root)
        except (AttributeError, TypeError):  # an earlier edit removed what this one changes
            pass


def _qemu_args_td(tmp_path, edit) -> list:
    """The problems of the golden qemu-args TD after ``edit`` of its argument values."""
    _, xml = golden("qemu-args", tmp_path)
    root = etree.fromstring(xml.encode())
    line = root.find(f"{{{QEMU}}}commandline")
    # without debug, which the scenario asks for and only a record would accept
    values = edit([a.get("value").replace('"attributes":268435457', '"attributes":268435456')
                   for a in line])
    for arg in list(line):
        line.remove(arg)
    for value in values:
        etree.SubElement(line, f"{{{QEMU}}}arg", value=value)
    return problems(root, libvirt_version=11_003_000)


def test_a_qemu_args_td_is_protected_only_while_the_machine_uses_its_tdx_object(tmp_path):
    assert _qemu_args_td(tmp_path, lambda v: v) == []
    machine = "confidential-guest-support=tdx"
    without_machine = _qemu_args_td(tmp_path, lambda v: [x for i, x in enumerate(v)
                                                         if machine not in v[i:i + 2]])
    overridden = _qemu_args_td(tmp_path, lambda v: v + ["-machine", "confidential-guest-support="])
    renamed = _qemu_args_td(tmp_path, lambda v: [x.replace('"id":"tdx"', '"id":"other"') for x in v])
    named_only = _qemu_args_td(tmp_path, lambda v: [x for x in v if "qom-type" not in x and x != "-object"]
                               + ["-name", "guest=tdx-guest"])
    for found in (without_machine, overridden, renamed, named_only):
        assert found[0].kind == "tdx-object", found  # (-name is also an argument of another's)
        assert {p.kind for p in found} <= {"tdx-object", "qemu-args"}, found
        assert "ordinary, unprotected VM" in found[0].what
    key_value = _qemu_args_td(tmp_path, lambda v: [
        "tdx-guest,id=tdx,attributes=0x10000000" if "qom-type" in x else x for x in v])
    assert key_value == []  # QEMU's key=value form of the same object


def golden(name: str, tmp_path):
    _, plan = plan_for(SCENARIOS[name], tmp_path / name)
    return plan, render_domain(plan)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["one-gpu", "native-unix-qgs", "two-gpus-numa"]),
       edits=st.lists(st.sampled_from(sorted(WEAKENINGS)), min_size=1, max_size=3, unique=True))
def test_any_weakening_of_a_golden_td_is_found(name, edits, tmp_path):
    plan, xml = golden(name, tmp_path)
    root = etree.fromstring(xml.encode())
    weaken(root, edits)
    found = problems(etree.tostring(root).decode(), libvirt_version=12_008_000,
                     window_needed_mib=lambda _: plan.mmio_mb)
    assert found, f"no problem found after {edits}"
    assert all(p.what and p.fix for p in found)


def test_a_window_too_small_for_the_devices_now_in_the_xml(tmp_path):
    plan, xml = golden("one-gpu", tmp_path)
    found = problems(xml, window_needed_mib=lambda bdfs: plan.mmio_mb * 2 * len(bdfs))
    assert [p.what for p in found] == [
        f"its 64-bit MMIO window ({plan.mmio_mb} MiB) is smaller than its devices' BARs need "
        f"({plan.mmio_mb * 2} MiB)"]


def test_a_managed_save_image_is_named_with_its_remedy(tmp_path):
    _, xml = golden("one-gpu", tmp_path)
    [found] = problems(xml, managed_save=True)
    assert found.fix == "`virsh managedsave-remove td-38-00-0`"


def test_plain_vms_and_foreign_plain_domains_have_no_td_rules(tmp_path):
    _, xml = golden("plain", tmp_path)
    assert problems(xml) == []
    assert problems("<domain type='kvm'><name>x</name></domain>") == []


# --- the same edits made by the tools users run, on the emulated TDX host ------------

run = run_sim  # the installed tdxvirt, as users run it (conftest); `td`: conftest's


def edited_with_virsh(sim, name: str, tmp_path, python_edit: str) -> None:
    """`virsh edit` with an EDITOR script that changes the XML as a person would."""
    editor = tmp_path / "editor.py"
    editor.write_text(f"#!{sys.executable}\nimport sys\nfrom lxml import etree\n"
                      f"path = sys.argv[1]\nroot = etree.parse(path).getroot()\n{python_edit}\n"
                      "etree.ElementTree(root).write(path)\n")
    editor.chmod(editor.stat().st_mode | stat.S_IXUSR)
    done = subprocess.run(["virsh", "-c", sim.qemu_uri, "edit", name], capture_output=True,
                          text=True, env={**os.environ, "EDITOR": str(editor)}, timeout=60)
    assert done.returncode == 0, done.stderr


def virt_xml(sim, name: str, *args: str) -> None:
    done = subprocess.run([shutil.which("virt-xml"), "--connect", sim.qemu_uri, name, *args],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


CASES = {
    "launch security deleted (virt-xml)": (
        lambda sim, name, tmp: virt_xml(sim, name, "--edit", "--xml", "xpath.delete=./launchSecurity"),
        "<launchSecurity type='tdx'> was removed"),
    "shared memory (virt-xml, as virt-manager's checkbox)": (
        lambda sim, name, tmp: virt_xml(sim, name, "--edit", "--memorybacking", "access.mode=shared"),
        "memory is shared"),
    "MMIO window removed (virsh edit)": (
        lambda sim, name, tmp: edited_with_virsh(sim, name, tmp, (
            "q = '{http://libvirt.org/schemas/domain/qemu/1.0}commandline'\n"
            "root.remove(root.find(q))")),
        "64-bit MMIO window"),
    "hostdev without iommufd (virsh edit)": (
        lambda sim, name, tmp: edited_with_virsh(sim, name, tmp, (
            "h = root.find('devices/hostdev')\nh.remove(h.find('driver'))")),
        "lost <driver iommufd='yes'/>"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_edits_by_real_tools_are_found_by_show_and_refused_by_start(case, td, sim, qemu_conn,
                                                                   tmp_path):
    edit, says = CASES[case]
    edit(sim, td, tmp_path)
    shown = run("show", td)
    assert shown.returncode == 0 and says in shown.stdout, shown.stdout
    listed = run("list")
    assert "!" in next(line for line in listed.stdout.splitlines() if line.startswith(td))
    started = run("start", td, "--skip-preflight")  # integrity is not a preflight to skip
    assert started.returncode != 0 and says in started.stderr
    assert len(started.stderr.strip().splitlines()) == 1
    assert not qemu_conn.lookupByName(td).isActive()


def test_a_deleted_loader_is_chosen_again_by_libvirts_qemu_driver(td, sim, qemu_conn):
    """libvirt keeps `<os firmware='efi'>` with the features it matched, so the real
    driver picks the TDX firmware again: nothing to report (the test driver does not,
    and there the hypothesis test above covers the missing loader)."""
    virt_xml(sim, td, "--edit", "--xml", "xpath.delete=./os/loader")
    xml = qemu_conn.lookupByName(td).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    loader = etree.fromstring(xml.encode()).find("os/loader")
    assert loader.get("type") == "rom" and loader.text.endswith("OVMF.inteltdx.ms.fd")
    assert problems(xml, libvirt_version=qemu_conn.getLibVersion()) == []


def test_virt_xml_cannot_turn_smm_on_for_a_td(td, sim):
    done = subprocess.run([shutil.which("virt-xml"), "--connect", sim.qemu_uri, td, "--edit",
                           "--features", "smm.state=on"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "not supported with SMM enabled" in done.stderr


def test_a_managed_save_is_shown_refused_at_start_and_named_at_undefine(td, sim, qemu_conn, cc_on):
    """On the emulated host QEMU can save the machine (it runs without tdx-guest; a real
    TD's QEMU refuses to migrate or save): tdxvirt must never resume one."""
    assert run("start", td).returncode == 0
    saved = subprocess.run(["virsh", "-c", sim.qemu_uri, "managedsave", td], capture_output=True,
                           text=True, timeout=120)
    assert saved.returncode == 0, saved.stderr
    assert " saved " in next(line for line in run("list").stdout.splitlines() if line.startswith(td))
    started = run("start", td)
    # pasteable: virsh asks the simulated host, as the failing start did (remedies.py)
    assert started.returncode != 0 and f"`virsh -c {shlex.quote(sim.qemu_uri)} managedsave-remove {td}`" \
        in started.stderr
    assert not qemu_conn.lookupByName(td).isActive()
    undefined = run("undefine", td)
    assert undefined.returncode != 0 and "managedsave-remove" in undefined.stderr
    assert len(undefined.stderr.strip().splitlines()) == 1
    qemu_conn.lookupByName(td).managedSaveRemove(0)


def test_gpu_list_names_every_holder_and_show_a_running_sharer(sim, qemu_conn, cc_on):
    names = [f"sh-{uuid.uuid4().hex[:6]}-{i}" for i in range(3)]
    for name in names:
        assert run("define", name, "--gpu", "38:00.0", "--allow-shared", "--memory", "512M",
                   "--vcpus", "1").returncode == 0
    try:
        listed = run("gpu", "list", "--json")
        [gpu] = [g for g in __import__("json").loads(listed.stdout) if g["address"] == "0000:38:00.0"]
        assert all(name in gpu["td"].split(",") for name in names)
        assert run("start", names[0]).returncode == 0
        shown = run("show", names[1])
        assert f"also passed through by running domain(s) '{names[0]}'" in shown.stdout
        assert "also passed through" not in run("show", names[0]).stdout
    finally:
        for name in names:
            run("destroy", name)
            run("undefine", name)
