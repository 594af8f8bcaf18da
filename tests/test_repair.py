"""`tdxvirt repair`: an edited TD back to what tdxvirt defined, the user's compatible
edits kept; on golden TDs (every weakening, libvirt's schema) and on the emulated TDX
host with the tools users run (virt-xml, virsh edit, virsh managedsave)."""

from __future__ import annotations

import copy
import subprocess
import uuid

import libvirt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree
from test_integrity import (
    CASES,
    SCENARIOS,
    TDS,
    WEAKENINGS,
    edited_with_virsh,
    golden,
    run,
    virt_xml,
    weaken,
)

from tdxvirt.domain.domainxml import NAMESPACE
from tdxvirt.domain.integrity import problems
from tdxvirt.domain.recorded import record_from
from tdxvirt.lifecycle.repair import DEFAULT_POLICY, plan_repair
from tdxvirt.virt.schema import validate_domain_xml

# Edits a user may make that keep a TD a TD; a repair must keep every one.
COMPATIBLE = {
    "vcpus": (lambda r: setattr(r.find("vcpu"), "text", "7"), lambda r: r.findtext("vcpu") == "7"),
    "memory": (lambda r: setattr(r.find("memory"), "text", "8388608"),
               lambda r: r.findtext("memory") == "8388608"),
    "disk added": (lambda r: r.find("devices").append(etree.fromstring(
        "<disk type='file' device='disk'><source file='/srv/data.img'/>"
        "<target dev='vdb' bus='virtio'/></disk>")),
                   lambda r: r.find("devices/disk/source[@file='/srv/data.img']") is not None),
}


def _repaired(xml: str, plan, **extra):
    return plan_repair(xml, libvirt_version=12_008_000,
                       window_needed_mib=lambda bdfs: plan.mmio_mb if bdfs else None, **extra)


def _record(xml: str):
    """Root's record of a golden TD, as define writes it."""
    return record_from(xml, str(uuid.uuid4()))


@pytest.mark.parametrize("name", TDS)
def test_an_untouched_golden_td_needs_no_repair(name, tmp_path):
    plan, xml = golden(name, tmp_path)
    repair = plan_repair(xml, libvirt_version=SCENARIOS[name].libvirt_version,
                         window_needed_mib=lambda _: plan.mmio_mb, record=_record(xml))
    assert not repair.needed and repair.changes == [] and repair.diff() == ""


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["one-gpu", "native-unix-qgs", "two-gpus-numa"]),
       edits=st.lists(st.sampled_from(sorted(WEAKENINGS)), min_size=1, max_size=4, unique=True),
       kept=st.lists(st.sampled_from(sorted(COMPATIBLE)), max_size=3, unique=True))
def test_any_weakening_is_repaired_and_compatible_edits_are_kept(name, edits, kept, tmp_path,
                                                                   schema_dir):
    plan, xml = golden(name, tmp_path)
    original = etree.fromstring(xml.encode())
    root = copy.deepcopy(original)
    for edit in kept:
        COMPATIBLE[edit][0](root)
    weaken(root, edits)
    record = _record(xml)
    repair = _repaired(etree.tostring(root).decode(), plan, record=record)
    assert repair.left == [] and repair.changes
    fixed = etree.fromstring(repair.after.encode())
    assert problems(fixed, libvirt_version=12_008_000, record=record,
                    window_needed_mib=lambda _: plan.mmio_mb) == []
    for edit in kept:
        assert COMPATIBLE[edit][1](fixed), f"{edit} lost by the repair after {edits}"
    # put back as defined, not merely "some" launch security and firmware
    for path in ("launchSecurity", "os/loader"):
        assert etree.tostring(fixed.find(path)).strip() == etree.tostring(original.find(path)).strip()
    validate_domain_xml(repair.after, schema_dir)


def test_a_td_defined_without_the_record_gets_defaults_and_says_so(tmp_path):
    plan, xml = golden("native-unix-qgs", tmp_path)
    root = etree.fromstring(xml.encode())
    mark = root.find(f"metadata/{{{NAMESPACE}}}td")
    mark.remove(mark.find(f"{{{NAMESPACE}}}protected"))  # as an older tdxvirt wrote it
    WEAKENINGS["launchSecurity"](root)
    WEAKENINGS["loader"](root)
    repair = _repaired(etree.tostring(root).decode(), plan)
    fixed = etree.fromstring(repair.after.encode())
    assert fixed.findtext("launchSecurity/policy") == DEFAULT_POLICY
    assert fixed.find("os").get("firmware") == "efi" and fixed.find("os/loader") is None
    assert any("default policy" in c for c in repair.changes)
    assert any("let libvirt pick a TDX firmware" in c for c in repair.changes)


def test_a_window_for_a_gpu_added_since_define_is_sized_for_both(tmp_path):
    plan, xml = golden("one-gpu", tmp_path)
    root = etree.fromstring(xml.encode())
    hostdev = copy.deepcopy(root.find("devices/hostdev"))
    hostdev.find("source/address").set("bus", "0x39")
    hostdev.find("address").set("bus", "0x09")
    root.find("devices").append(hostdev)
    repair = plan_repair(etree.tostring(root).decode(), libvirt_version=12_008_000,
                         window_needed_mib=lambda bdfs: plan.mmio_mb * len(bdfs))
    assert repair.changes == [f"set the 64-bit MMIO window to {plan.mmio_mb * 2} MiB "
                              "(for the hostdevs it has now)"]
    assert f"string={plan.mmio_mb * 2}" in repair.after and f"string={plan.mmio_mb}'" not in repair.after


def test_a_window_smaller_than_the_bars_is_refused(tmp_path):
    from tdxvirt.errors import InputError

    plan, xml = golden("one-gpu", tmp_path)
    root = etree.fromstring(xml.encode())
    WEAKENINGS["window"](root)
    with pytest.raises(InputError, match="--mmio-window 32G is smaller than the 256G"):
        _repaired(etree.tostring(root).decode(), plan, window_override=32 << 30)


def test_a_qemu_args_td_gets_its_tdx_object_back_and_loses_arguments_nobody_recorded(tmp_path):
    plan, xml = golden("qemu-args", tmp_path)
    root = etree.fromstring(xml.encode())
    line = root.find("{http://libvirt.org/schemas/domain/qemu/1.0}commandline")
    users = ["-device", "virtio-rng-pci"]
    for arg in list(line)[:2]:  # the -object tdx-guest pair
        line.remove(arg)
    for value in users:
        etree.SubElement(line, "{http://libvirt.org/schemas/domain/qemu/1.0}arg", value=value)
    repair = _repaired(etree.tostring(root).decode(), plan, record=_record(xml))
    values = [a.get("value") for a in etree.fromstring(repair.after.encode()).find(line.tag)]
    assert any("tdx-guest" in v for v in values) and "virtio-rng-pci" not in values
    assert values.count("-fw_cfg") == 1


def test_a_qemu_args_td_gets_its_machine_back_and_loses_an_override(tmp_path):
    plan, xml = golden("qemu-args", tmp_path)
    root = etree.fromstring(xml.encode())
    line = root.find("{http://libvirt.org/schemas/domain/qemu/1.0}commandline")
    for arg in [a for a in line if a.get("value") in ("-machine", "confidential-guest-support=tdx")]:
        line.remove(arg)  # the machine no longer uses the object
    for value in ("-machine", "confidential-guest-support=", "-device", "virtio-rng-pci"):
        etree.SubElement(line, line.tag.replace("commandline", "arg"), value=value)
    record = _record(xml)
    repair = _repaired(etree.tostring(root).decode(), plan, record=record)
    assert repair.left == [] and problems(repair.after, libvirt_version=12_008_000, record=record) == []
    values = [a.get("value") for a in etree.fromstring(repair.after.encode()).find(line.tag)]
    assert "confidential-guest-support=tdx" in values and "confidential-guest-support=" not in values
    assert "virtio-rng-pci" not in values  # QEMU arguments root did not record go


def test_a_policy_repair_keeps_the_quote_service_and_measurement_values(tmp_path):
    plan, xml = golden("native-unix-qgs", tmp_path)
    root = etree.fromstring(xml.encode())
    mark = root.find(f"metadata/{{{NAMESPACE}}}td")
    mark.remove(mark.find(f"{{{NAMESPACE}}}protected"))  # no record: the default policy
    root.find("launchSecurity/policy").text = "0x10000005"
    root.find("launchSecurity/mrConfigId").text = "A" * 64  # the user's own, since define
    repair = _repaired(etree.tostring(root).decode(), plan)
    launch = etree.fromstring(repair.after.encode()).find("launchSecurity")
    assert launch.findtext("policy") == DEFAULT_POLICY
    assert launch.findtext("mrConfigId") == "A" * 64
    assert launch.find("quoteGenerationService") is not None
    assert repair.changes == ["set the TDX policy back to 0x10000000 (tdxvirt's default: this TD's "
                              "own was not recorded)"]


def test_a_plain_vm_is_not_a_td_to_repair(tmp_path):
    plan, xml = golden("plain", tmp_path)
    repair = plan_repair(xml, libvirt_version=12_008_000)
    assert not repair.is_td and not repair.needed


# --- with the tools users run, on the emulated TDX host ---------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_edits_by_real_tools_are_repaired_and_the_td_starts(case, td, sim, qemu_conn, cc_on,
                                                            tmp_path):
    virt_xml(sim, td, "--edit", "--vcpus", "2")  # a compatible edit first: it must survive
    edit, says = CASES[case]
    edit(sim, td, tmp_path)
    domain = qemu_conn.lookupByName(td)
    weakened = domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)

    dry = run("repair", td, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "--- current definition" in dry.stdout and "Would change:" in dry.stdout
    assert domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == weakened  # nothing changed

    done = run("repair", td)
    assert done.returncode == 0, done.stderr
    assert f"Repaired '{td}'" in done.stdout
    assert says not in run("show", td).stdout
    assert domain.vcpus is not None and domain.info()[3] == 2
    assert run("repair", td).stdout.strip() == f"'{td}' is the TD tdxvirt defined: nothing to repair"
    started = run("start", td)
    assert started.returncode == 0, started.stderr


def test_a_managed_save_image_is_removed_by_repair(td, sim, qemu_conn, cc_on):
    assert run("start", td).returncode == 0
    saved = subprocess.run(["virsh", "-c", sim.qemu_uri, "managedsave", td], capture_output=True,
                           text=True, timeout=120)
    assert saved.returncode == 0, saved.stderr
    dry = run("repair", td, "--dry-run")
    assert "remove the managed-save image" in dry.stdout
    assert qemu_conn.lookupByName(td).hasManagedSaveImage(0)
    assert run("repair", td).returncode == 0
    assert not qemu_conn.lookupByName(td).hasManagedSaveImage(0)
    assert run("start", td).returncode == 0  # booted afresh, not resumed


def test_a_running_td_is_repaired_for_its_next_start(td, sim, qemu_conn, cc_on):
    assert run("start", td).returncode == 0
    virt_xml(sim, td, "--edit", "--memorybacking", "access.mode=shared")
    done = run("repair", td)
    assert done.returncode == 0 and "takes effect when it is next started" in done.stdout
    inactive = qemu_conn.lookupByName(td).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert "mode='shared'" not in inactive and "mode=\"shared\"" not in inactive


def _one_line(result, code: int) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdxvirt: error: "), result.stderr
    return lines[0]


def test_bad_inputs_get_one_line_and_change_nothing(td, sim, qemu_conn, tmp_path):
    assert "no domain named 'no-such-td'" in _one_line(run("repair", "no-such-td"), 2)
    edited_with_virsh(sim, td, tmp_path, "q = '{http://libvirt.org/schemas/domain/qemu/1.0}commandline'\n"
                      "root.remove(root.find(q))")
    before = qemu_conn.lookupByName(td).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert "is smaller than" in _one_line(run("repair", td, "--mmio-window", "1G"), 2)
    assert "--mmio-window" in _one_line(run("repair", td, "--mmio-window", "lots"), 2)
    assert qemu_conn.lookupByName(td).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == before
