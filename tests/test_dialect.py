"""Choosing the TDX XML dialect from what the target libvirt reports."""

from __future__ import annotations

import pytest
from lxml import etree

from tdxvirt.errors import HostNotReadyError
from tdxvirt.sim.hostroot import build_host_root
from tdxvirt.virt.dialect import LibvirtFacts, choose, domcaps_report_tdx, host_tdx_enabled, probe


def facts(version, domcaps_tdx, driver="QEMU"):
    return LibvirtFacts(version, driver, domcaps_tdx, "qemu:///system")


@pytest.fixture(scope="module")
def real_domcaps(qemu_conn):
    """Domain capabilities of the emulated TDX host's real qemu driver (libvirt 12.x)."""
    return qemu_conn.getDomainCapabilities(None, "x86_64", "q35", "kvm", 0)


def test_the_emulated_tdx_hosts_domcaps_report_tdx(real_domcaps):
    assert domcaps_report_tdx(real_domcaps) is True
    caps = etree.fromstring(real_domcaps.encode())
    assert caps.findtext("domain") == "kvm"
    assert "tdx" in caps.xpath("features/launchSecurity/enum[@name='sectype']/value/text()")


def test_domcaps_without_the_tdx_feature_report_no_tdx(real_domcaps):
    # The same real document as a host without TDX gives it.
    caps = etree.fromstring(real_domcaps.encode())
    for tdx in caps.findall("features/tdx"):
        tdx.set("supported", "no")
    for value in caps.xpath("features/launchSecurity/enum/value[.='tdx']"):
        value.getparent().remove(value)
    assert domcaps_report_tdx(etree.tostring(caps).decode()) is False


def test_libvirt_11_with_qemu_10_reports_no_tdx(legacy_qemu_conn):
    caps = legacy_qemu_conn.getDomainCapabilities(None, "x86_64", "q35", "kvm", 0)
    assert domcaps_report_tdx(caps) is False


def test_probe_of_the_test_driver_leaves_domcaps_unknown(conn):
    probed = probe(conn)
    assert probed.driver.upper() == "TEST" and probed.domcaps_tdx is None
    assert probed.version >= 12_000_000


def test_probe_of_the_emulated_tdx_host_says_tdx(qemu_conn):
    probed = probe(qemu_conn)
    assert probed.driver.upper() == "QEMU" and probed.domcaps_tdx is True
    assert probed.version >= 12_000_000


def test_probe_of_libvirt_11_says_no_tdx(legacy_qemu_conn):
    assert probe(legacy_qemu_conn).domcaps_tdx is False


@pytest.mark.parametrize("libvirt_facts, host_tdx, expected", [
    (facts(12_008_000, True), True, "native"),
    (facts(11_006_000, True), None, "native"),
    (facts(12_008_000, None, "TEST"), True, "native"),
    (facts(11_000_000, True), None, "canonical"),
])
def test_auto_choice(libvirt_facts, host_tdx, expected):
    assert choose(None, libvirt_facts, host_tdx) == expected


@pytest.mark.parametrize("libvirt_facts, host_tdx, message", [
    (facts(11_003_000, False), None, "does not know TDX launch security.*--dialect qemu-args"),
    (facts(12_008_000, False), True, "reports no TDX support"),
    (facts(12_008_000, None, "TEST"), False, "TDX is not enabled in KVM"),
])
def test_host_that_cannot_run_tds_names_what_is_missing(libvirt_facts, host_tdx, message):
    with pytest.raises(HostNotReadyError, match=message):
        choose(None, libvirt_facts, host_tdx)


def test_forcing_a_dialect_skips_host_checks():
    assert choose("qemu-args", facts(11_003_000, False), False) == "qemu-args"


def test_host_tdx_from_the_kvm_intel_parameter(tmp_path):
    assert host_tdx_enabled(build_host_root(tmp_path / "on")) is True
    assert host_tdx_enabled(build_host_root(tmp_path / "off", tdx_enabled=False)) is False


def test_real_libvirt_11_is_refused_unless_qemu_args_is_forced(legacy_qemu_conn, gpu_host):
    """Against a real libvirt 11.x daemon: auto-detection names what is missing; the
    forced native XML is refused by libvirt itself in one line; qemu-args defines."""
    import uuid

    from tdxvirt.domain.spec import TDSpec
    from tdxvirt.errors import LibvirtOperationError
    from tdxvirt.lifecycle import tds

    host, gpu = gpu_host
    name = f"l-{uuid.uuid4().hex[:10]}"
    with pytest.raises(HostNotReadyError, match=r"libvirt 11\.\d+\.\d+ .* does not know TDX"):
        tds.define_td(legacy_qemu_conn, host, TDSpec.from_user(name=name, gpus=[gpu]))
    with pytest.raises(LibvirtOperationError, match="launchSecurity") as refused:
        tds.define_td(legacy_qemu_conn, host, TDSpec.from_user(
            name=name, gpus=[gpu], dialect="native", virt_type="qemu"))
    assert "\n" not in str(refused.value)
    assert name not in [d.name() for d in legacy_qemu_conn.listAllDomains(0)]
    td = tds.define_td(legacy_qemu_conn, host, TDSpec.from_user(
        name=name, gpus=[gpu], dialect="qemu-args", virt_type="qemu"))
    try:
        assert td.plan.dialect == "qemu-args" and not td.plan.iommufd
        listed = {r.facts.name: r for r in tds.list_tds(legacy_qemu_conn)}
        assert listed[name].facts.tdx and listed[name].facts.dialect == "qemu-args"
    finally:
        tds.undefine(legacy_qemu_conn, name)
