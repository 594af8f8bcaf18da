"""Golden XML per scenario, libvirt's schema, and libvirt's own read-back.

Regenerate the golden files after an intended template change with
``scripts/test tests/test_golden.py --regen-golden`` and review the diff.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import libvirt
import pytest
from lxml import etree
from scenarios import plan_for, scenarios
from xmltools import dropped_elements

from tdxvirt.domain.render import render_domain
from tdxvirt.domain.spec import TDSpec
from tdxvirt.domain.td_rules import td_problems
from tdxvirt.virt.schema import validate_domain_xml

GOLDEN = Path(__file__).parent / "golden"
SCENARIOS = {s.name: s for s in scenarios()}


def normalise(xml: str) -> str:
    parser = etree.XMLParser(remove_blank_text=True)
    return etree.tostring(etree.fromstring(xml.encode(), parser), pretty_print=True).decode()


@pytest.fixture(params=sorted(SCENARIOS))
def rendered(request, tmp_path):
    scenario = SCENARIOS[request.param]
    spec, plan = plan_for(scenario, tmp_path / "root")
    return scenario, spec, plan, render_domain(plan)


def test_matches_golden_file(rendered, regen_golden):
    scenario, _, _, xml = rendered
    golden = GOLDEN / f"{scenario.name}.xml"
    if regen_golden:
        GOLDEN.mkdir(exist_ok=True)
        golden.write_text(normalise(xml))
    assert golden.exists(), f"no golden file {golden}: run with --regen-golden"
    assert normalise(xml) == golden.read_text()


def test_schema_and_td_rules(rendered, schema_dir):
    scenario, _, plan, xml = rendered
    assert td_problems(xml) == []
    if scenario.dialect == "canonical":
        with pytest.raises(Exception, match="schema"):  # upstream rejects SocketAddress
            validate_domain_xml(xml, schema_dir)
    else:
        assert validate_domain_xml(xml, schema_dir)


def test_defined_on_tdx_aware_libvirt_with_nothing_dropped(rendered, conn):
    scenario, _, plan, _ = rendered
    if not scenario.round_trip:
        pytest.skip(scenario.notes)
    xml = render_domain(dataclasses.replace(plan, name=f"g-{uuid.uuid4().hex[:10]}"))
    domain = conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    try:
        assert dropped_elements(xml, domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), test_driver=True) == []
    finally:
        domain.undefine()


@pytest.mark.parametrize("which", ["libvirt 11.x (no TDX XML)", "libvirt 12.x"])
def test_qemu_args_dialect_defined_on_real_qemu_driver(tmp_path, which, request):
    """A real qemu driver keeps the qemu:commandline dialect intact (TCG here): libvirt
    11.x, which rejects TDX XML (the dialect's reason to exist), and 12.x."""
    qemu_conn = request.getfixturevalue(
        "legacy_qemu_conn" if which.startswith("libvirt 11") else "qemu_conn")
    _, plan = plan_for(SCENARIOS["qemu-args"], tmp_path / "root")
    # No KVM here, and the test emulator path exists only outside the daemon's root.
    plan = dataclasses.replace(plan, name=f"g-{uuid.uuid4().hex[:10]}", virt_type="qemu",
                               emulator=None)
    xml = render_domain(plan)
    domain = qemu_conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    try:
        dumped = domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        assert dropped_elements(xml, dumped) == []
        args = etree.fromstring(dumped.encode()).xpath(
            "//q:arg/@value", namespaces={"q": "http://libvirt.org/schemas/domain/qemu/1.0"})
        assert args[0] == "-object" and '"qom-type":"tdx-guest"' in args[1]
        assert "confidential-guest-support=tdx" in args[3]
    finally:
        domain.undefine()


def test_every_spec_field_reaches_a_golden_scenario(tmp_path):
    """A TDSpec field that no scenario sets is a field no golden file covers."""
    defaults = TDSpec(name="x", gpus=())
    covered = set()
    for scenario in SCENARIOS.values():
        spec, _ = plan_for(scenario, tmp_path / scenario.name)
        covered |= {f.name for f in dataclasses.fields(TDSpec)
                    if getattr(spec, f.name) != getattr(defaults, f.name)}
    missing = {f.name for f in dataclasses.fields(TDSpec)} - covered - {"name"}
    assert missing == set(), f"no golden scenario sets: {sorted(missing)}"


def test_ppcie_layout_passes_switches_and_sizes_the_window(tmp_path):
    _, plan = plan_for(SCENARIOS["ppcie-8gpu-4nvswitch"], tmp_path / "root")
    kinds = [h.kind for h in plan.hostdevs]
    assert kinds.count("gpu") == 8 and kinds.count("nvswitch") == 4
    assert plan.root_ports == tuple(range(1, 13))
    assert plan.mmio_mb * 1024 * 1024 > 1024 ** 4  # eight H100s need more than 1 TiB
    assert not plan.iommufd and not plan.managed
