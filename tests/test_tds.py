"""Defining and driving TDs on the real TDX-aware libvirt (12.x test driver, daemon)."""

from __future__ import annotations

import libvirt
import pytest
from xmltools import dropped_elements

from tdxvirt.domain.spec import TDSpec
from tdxvirt.errors import HostNotReadyError, InputError, LibvirtOperationError, NotFoundError
from tdxvirt.lifecycle import tds
from tdxvirt.virt.schema import validate_domain_xml


def _spec(name, gpu, **user):
    return TDSpec.from_user(name=name, gpus=[gpu], **user)


def test_define_reads_back_with_nothing_dropped(conn, gpu_host, td_name, schema_dir):
    host, gpu = gpu_host
    td = tds.define_td(conn, host, _spec(td_name, gpu))
    # define leaves the schema to libvirt (VIR_DOMAIN_DEFINE_VALIDATE); the XML it
    # defined passes the local schema as well
    assert not td.schema_checked
    assert validate_domain_xml(td.xml, schema_dir)
    dumped = conn.lookupByName(td_name).XMLDesc(0)
    assert dropped_elements(td.xml, dumped, test_driver=True) == []
    assert dropped_elements(td.xml, conn.lookupByName(td_name).XMLDesc(
        libvirt.VIR_DOMAIN_XML_INACTIVE), test_driver=True) == []


def test_lifecycle_start_list_stop_destroy_undefine(conn, gpu_host, td_name):
    host, gpu = gpu_host
    tds.define_td(conn, host, _spec(td_name, gpu, vcpus=8, memory="32G"))
    row = {r.facts.name: r for r in tds.list_tds(conn)}[td_name]
    assert (row.state, row.facts.vcpus, row.facts.memory_kib) == ("shut off", 8, 32 * 1024 * 1024)
    assert row.facts.gpus == (gpu,)
    assert tds.start(conn, host, td_name) is True
    assert tds.start(conn, host, td_name) is False  # already running: a no-op
    assert {r.facts.name: r.state for r in tds.list_tds(conn)}[td_name] == "running"
    with pytest.raises(LibvirtOperationError, match="is running; stop it first"):
        tds.undefine(conn, td_name)
    assert tds.stop(conn, td_name, timeout=10) is True
    assert not conn.lookupByName(td_name).isActive()
    assert tds.destroy(conn, td_name) is False
    tds.start(conn, host, td_name)
    assert tds.destroy(conn, td_name) is True
    tds.undefine(conn, td_name)
    with pytest.raises(NotFoundError):
        tds.lookup(conn, td_name)


def test_lookup_by_uuid_and_id_like_virsh(conn, gpu_host, td_name):
    host, gpu = gpu_host
    tds.define_td(conn, host, _spec(td_name, gpu))
    uuid = conn.lookupByName(td_name).UUIDString()
    assert tds.lookup(conn, uuid).name() == td_name
    tds.start(conn, host, td_name)
    assert tds.lookup(conn, str(conn.lookupByName(td_name).ID())).name() == td_name


def test_existing_name_is_refused_and_left_alone(conn, gpu_host, td_name):
    host, gpu = gpu_host
    tds.define_td(conn, host, _spec(td_name, gpu, vcpus=2))
    before = conn.lookupByName(td_name).XMLDesc(0)
    with pytest.raises(InputError, match="already exists"):
        tds.define_td(conn, host, _spec(td_name, gpu, vcpus=6))
    assert conn.lookupByName(td_name).XMLDesc(0) == before


def test_gpu_held_by_another_domain_is_refused(conn, gpu_host, td_name):
    host, gpu = gpu_host
    tds.define_td(conn, host, _spec(td_name, gpu))
    with pytest.raises(InputError, match=f"already given to domain '{td_name}'"):
        tds.define_td(conn, host, _spec(td_name + "b", gpu))
    assert td_name + "b" not in [d.name() for d in conn.listAllDomains(0)]


def test_foreign_tdx_domain_is_listed_only_with_all(conn, gpu_host, td_name):
    host, gpu = gpu_host
    xml = tds.assemble_td(conn, host, _spec(td_name, gpu)).xml
    # The same TD without tdxvirt's metadata: as another tool would define it.
    start, end = xml.index("<metadata>"), xml.index("</metadata>") + len("</metadata>")
    conn.defineXMLFlags(xml[:start] + xml[end:], tds.DEFINE_VALIDATE)
    assert td_name not in [r.facts.name for r in tds.list_tds(conn)]
    row = {r.facts.name: r for r in tds.list_tds(conn, include_foreign=True)}[td_name]
    assert row.facts.tdx and not row.facts.managed_by_tdxvirt


def test_libvirt_without_tdx_is_host_not_ready(gpu_host, td_name):
    # The system's own libvirt (9.0 on Debian 12, 11.3 on Debian 13), in process.
    old = libvirt.open("test:///default")
    try:
        if old.getLibVersion() >= 11_006_000:
            pytest.skip("the system libvirt already knows TDX")
        host, gpu = gpu_host
        with pytest.raises(HostNotReadyError, match="does not know TDX launch security"):
            tds.define_td(old, host, _spec(td_name, gpu))
        assert td_name not in [d.name() for d in old.listAllDomains(0)]
    finally:
        old.close()


def test_missing_gpu_defines_nothing(conn, host_root, td_name):
    with pytest.raises(NotFoundError, match="no PCI device 0000:39:00.0"):
        tds.define_td(conn, host_root, TDSpec.from_user(name=td_name, gpus=["39:00.0"]))
    assert td_name not in [d.name() for d in conn.listAllDomains(0)]


def test_domain_undefined_between_listing_and_reading_is_skipped(conn, gpu_host, td_name):
    """Another process may undefine a domain while tdxvirt walks the list."""
    from tdxvirt.virt.conn import xml_of_listed

    host, gpu = gpu_host
    tds.define_td(conn, host, _spec(td_name, gpu))
    stale = conn.lookupByName(td_name)
    conn.lookupByName(td_name).undefine()
    assert xml_of_listed(stale) is None
    assert td_name not in [r.facts.name for r in tds.list_tds(conn)]


def test_define_has_libvirt_validate_what_tdxvirt_renders(conn, gpu_host, td_name, monkeypatch):
    """define skips the local schema load because libvirt validates: a rendering that
    breaks the schema is still refused, by the daemon, and nothing is defined."""
    from tdxvirt.lifecycle import assemble

    host, gpu = gpu_host
    real = assemble.render_domain
    monkeypatch.setattr(assemble, "render_domain", lambda plan: real(plan).replace(
        "<vcpu", "<vcpus-not-in-schema/><vcpu", 1))
    with pytest.raises(LibvirtOperationError, match="validate|schema|Relax-NG"):
        tds.define_td(conn, host, _spec(td_name, gpu))
    assert td_name not in conn.listDefinedDomains()
