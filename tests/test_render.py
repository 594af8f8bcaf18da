"""Rendered domain XML, checked by libvirt's own RelaxNG schema (libvirt 12.x)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from tdxvirt.domain.domainxml import NAMESPACE, read_domain_xml
from tdxvirt.domain.policy import plan_domain
from tdxvirt.domain.render import render_domain
from tdxvirt.domain.spec import TDSpec
from tdxvirt.errors import TdxvirtError
from tdxvirt.host.pci import read_device
from tdxvirt.pci import PciAddress
from tdxvirt.virt.schema import validate_domain_xml

NATIVE = 12_008_000


def _render(host_root, **user):
    spec = TDSpec.from_user(**{"name": "td1", "gpus": ["38:00.0"], **user})
    devices = [read_device(host_root, g) for g in spec.gpus]
    return render_domain(plan_domain(spec, gpus=devices, dialect="native", libvirt_version=NATIVE,
                                     loader="/usr/share/ovmf/OVMF.inteltdx.ms.fd"))


def test_native_td_is_schema_valid_and_has_every_tdx_constraint(host_root, schema_dir):
    xml = _render(host_root)
    assert validate_domain_xml(xml, schema_dir) is True
    root = etree.fromstring(xml.encode())
    assert root.get("type") == "kvm"
    assert root.findtext("launchSecurity[@type='tdx']/policy") == "0x10000000"
    assert root.find("os/type").get("machine") == "q35"
    loader = root.find("os/loader")
    assert (loader.get("type"), loader.get("readonly"), loader.text) == (
        "rom", "yes", "/usr/share/ovmf/OVMF.inteltdx.ms.fd")
    assert root.find("os/nvram") is None
    assert root.find("features/ioapic").get("driver") == "qemu"
    assert root.find("features/smm").get("state") == "off"
    assert root.find("features/pmu").get("state") == "off"
    assert root.find("cpu").get("mode") == "host-passthrough"
    args = root.xpath("q:commandline/q:arg/@value",
                      namespaces={"q": "http://libvirt.org/schemas/domain/qemu/1.0"})
    assert args == ["-fw_cfg", "name=opt/ovmf/X-PciMmio64Mb,string=262144"]
    assert root.find("sysinfo") is None  # the qemu driver reserves opt/ovmf/ there
    ports = root.findall("devices/controller[@model='pcie-root-port']")
    hostdev = root.find("devices/hostdev[@mode='subsystem'][@type='pci']")
    assert [p.get("index") for p in ports] == ["1"]
    assert hostdev.get("managed") == "yes"
    assert hostdev.find("driver").get("iommufd") == "yes"
    assert hostdev.find("source/address").attrib == {
        "domain": "0x0000", "bus": "0x38", "slot": "0x00", "function": "0x0"}
    assert hostdev.find("address").get("bus") == "0x01"
    facts = read_domain_xml(xml)
    assert facts.managed_by_tdxvirt and facts.tdx and facts.gpus == ("0000:38:00.0",)
    assert root.find(f"metadata/{{{NAMESPACE}}}td") is not None


def test_image_path_is_escaped_not_injected(host_root, schema_dir, tmp_path):
    image = tmp_path / "a&b'<c>\".qcow2"
    image.write_bytes(b"QFI\xfb" + b"\0" * 508)
    xml = _render(host_root, disk=str(image), disk_format="qcow2")  # never guessed
    validate_domain_xml(xml, schema_dir)
    disk = etree.fromstring(xml.encode()).find("devices/disk")
    assert disk.find("source").get("file") == str(image)
    assert disk.find("driver").get("type") == "qcow2"


def test_raw_image_is_declared_raw(host_root, schema_dir, tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * 512)
    disk = etree.fromstring(_render(host_root, disk=str(image)).encode()).find("devices/disk")
    assert disk.find("driver").get("type") == "raw"


def test_schema_violation_is_reported_as_tdxvirt_error(host_root, schema_dir):
    broken = _render(host_root).replace("<vcpu placement='static'>", "<vcpu placement='nowhere'>")
    with pytest.raises(TdxvirtError, match="fails libvirt's schema at line"):
        validate_domain_xml(broken, schema_dir)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    vcpus=st.integers(1, 1024),
    memory_mib=st.integers(1, 4 * 1024 * 1024),
    gpu_buses=st.lists(st.integers(0, 0xFF), min_size=1, max_size=8, unique=True),
)
def test_any_valid_spec_renders_schema_valid_xml(tmp_path_factory, schema_dir, vcpus, memory_mib, gpu_buses):
    from tdxvirt.sim.hostroot import FakePciDevice, build_host_root

    addresses = [f"0000:{bus:02x}:00.0" for bus in gpu_buses]
    root = build_host_root(tmp_path_factory.mktemp("r") / "root", devices=tuple(
        FakePciDevice(a, iommu_group=i) for i, a in enumerate(addresses)))
    spec = TDSpec.from_user(name="p", gpus=addresses, vcpus=vcpus, memory=str(memory_mib))
    plan = plan_domain(spec, gpus=[read_device(root, g) for g in spec.gpus], dialect="native",
                       libvirt_version=NATIVE, loader="/fw.fd")
    xml = render_domain(plan)
    assert validate_domain_xml(xml, schema_dir)
    assert read_domain_xml(xml).gpus == tuple(addresses)
    assert len(etree.fromstring(xml.encode()).findall("devices/hostdev")) == len(addresses)
    assert PciAddress.parse(addresses[0]) == spec.gpus[0]
