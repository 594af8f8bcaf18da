"""Parsers of user input: PCI addresses, sizes, names, vCPUs, files."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tdxvirt.domain.spec import TDSpec, default_name, parse_gpus, validate_name, validate_vcpus
from tdxvirt.errors import InputError
from tdxvirt.pci import PciAddress
from tdxvirt.units import GIB, MIB, parse_size


@pytest.mark.parametrize("text, expected", [
    ("38:00.0", "0000:38:00.0"),
    ("0000:38:00.0", "0000:38:00.0"),
    ("38:1f.7", "0000:38:1f.7"),
    ("ABCD:B8:00.1", "abcd:b8:00.1"),
    (" 38:00.0 ", "0000:38:00.0"),
])
def test_pci_address_accepts_both_forms(text, expected):
    assert str(PciAddress.parse(text)) == expected


@pytest.mark.parametrize("text", [
    "zz:00.0", "38:00", "38:00.8", "38:20.0", "00000:38:00.0", "38.00.0", "", "0x38:00.0",
    "38:00.0\n39:00.0", "38:00.0;", "../38:00.0",
])
def test_pci_address_rejects(text):
    with pytest.raises(InputError, match="invalid PCI address"):
        PciAddress.parse(text)


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFF), st.integers(0, 0x1F), st.integers(0, 7))
def test_pci_address_round_trips(domain, bus, slot, function):
    address = PciAddress(domain, bus, slot, function)
    assert PciAddress.parse(str(address)) == address
    if domain == 0:
        assert PciAddress.parse(address.short) == address


@given(st.text())
def test_pci_address_any_text_is_parsed_or_input_error(text):
    try:
        PciAddress.parse(text)
    except InputError:
        pass


def test_same_gpu_twice_in_either_form_is_refused():
    with pytest.raises(InputError, match="given twice"):
        parse_gpus(["38:00.0", "0000:38:00.0"])


@pytest.mark.parametrize("text, expected", [
    ("16G", 16 * GIB), ("16g", 16 * GIB), ("16GiB", 16 * GIB), ("16GB", 16 * GIB),
    ("2048", 2048 * MIB), ("512M", 512 * MIB), ("1T", 1024 * GIB), ("4096K", 4 * MIB),
])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["0", "0G", "12XB", "-1G", "1.5G", "G", "", "65T", "1e9"])
def test_bad_sizes(text):
    with pytest.raises(InputError, match="--memory"):
        parse_size(text, "--memory")


@given(st.text())
def test_any_size_text_is_parsed_or_input_error(text):
    try:
        assert parse_size(text) > 0
    except InputError:
        pass


@pytest.mark.parametrize("name", ["a/b", "a<b", "", "-x", ".hidden", "x" * 65, "a b", "é", "a\nb"])
def test_bad_names(name):
    with pytest.raises(InputError, match="invalid TD name"):
        validate_name(name)


@given(st.text(alphabet=string.ascii_letters + string.digits + "._+-", min_size=1, max_size=64))
def test_names_are_valid_or_input_error(name):
    try:
        assert validate_name(name) == name
    except InputError:
        assert not name[0].isalnum()


def test_default_names_are_valid():
    gpus = parse_gpus(["38:00.0", "b8:00.0"])
    assert default_name(gpus[:1]) == "td-38-00-0"
    assert default_name(gpus) == "td-38-00-0-x2"
    assert validate_name(default_name(gpus))


@pytest.mark.parametrize("vcpus", [0, -1, 1025, True])
def test_bad_vcpus(vcpus):
    with pytest.raises(InputError, match="--vcpus"):
        validate_vcpus(vcpus)


def test_spec_from_user_checks_image(tmp_path):
    with pytest.raises(InputError, match="--image"):
        TDSpec.from_user(name=None, gpus=["38:00.0"], image=str(tmp_path / "missing.qcow2"))
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 512)
    spec = TDSpec.from_user(name=None, gpus=["38:00.0"], image=str(image), memory="8G")
    assert spec.name == "td-38-00-0"
    assert spec.image == str(image)
    assert spec.memory == 8 * GIB


@given(st.text())
def test_tdx_option_parsers_raise_only_input_error(text):
    from tdxvirt.domain.tdx_options import parse_measurement, parse_policy, parse_qgs

    for parser in (parse_policy, lambda t: parse_measurement(t, "--mr-owner"), parse_qgs):
        try:
            parser(text)
        except InputError:
            pass


@given(st.binary(min_size=0, max_size=96))
def test_measurement_accepts_exactly_48_bytes(raw):
    import base64

    from tdxvirt.domain.tdx_options import parse_measurement

    text = base64.b64encode(raw).decode()
    if len(raw) == 48:
        assert base64.b64decode(parse_measurement(text, "--mr-owner")) == raw
    else:
        with pytest.raises(InputError, match="not 48"):
            parse_measurement(text, "--mr-owner")


@pytest.mark.parametrize("text, policy", [("0x10000000", 0x10000000), ("10000000", 0x10000000),
                                          ("0x1", 1), ("0x10000001", 0x10000001), ("0", 0)])
def test_policies(text, policy):
    from tdxvirt.domain.tdx_options import parse_policy

    assert parse_policy(text) == policy
