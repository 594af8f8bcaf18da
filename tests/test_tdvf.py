"""MRTD prediction from TDVF metadata, checked against a second implementation.

The second implementation below is written from the specifications, not from
tdxvirt.domain.tdvf: it finds the descriptor by its signature instead of through OVMF's
GUIDed table, lists every TDX module operation as an event first, and hashes the
concatenated extension buffers in one call.
"""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdxvirt.domain.tdvf import SINGLE_PASS, TWO_PASS, firmware_mrtd, mrtd, parse
from tdxvirt.errors import InputError


def reference_sections(image: bytes) -> list[tuple[int, int, int, int, int, int]]:
    """Every 'TDVF' signature whose header is self-consistent; exactly one is expected."""
    found, at = [], image.find(b"TDVF")
    while at != -1:
        if at + 16 <= len(image):
            length, version, count = struct.unpack("<III", image[at + 4:at + 16])
            if version == 1 and 0 < count < 64 and length == 16 + 32 * count:
                found.append([struct.unpack("<IIQQII", image[at + 16 + 32 * i:at + 48 + 32 * i])
                              for i in range(count)])
        at = image.find(b"TDVF", at + 1)
    assert len(found) == 1, f"{len(found)} TDVF descriptors"
    return found[0]


def reference_mrtd(image: bytes, sections, two_pass: bool) -> str:
    events = []  # ("add", gpa) | ("extend", gpa, 256 bytes)
    for offset, raw, address, size, _type, attributes in sections:
        adds = [] if attributes & 2 else [("add", address + p) for p in range(0, size, 4096)]
        extends = []
        if attributes & 1:
            body = image[offset:offset + raw] + bytes(size - raw)
            extends = [("extend", address + c, body[c:c + 256]) for c in range(0, size, 256)]
        if two_pass:
            events += adds + extends
        else:
            for page in range(0, size, 4096):
                events += [e for e in adds if e[1] == address + page]
                events += [e for e in extends if address + page <= e[1] < address + page + 4096]
    stream = []
    for event in events:
        tag = b"MEM.PAGE.ADD" if event[0] == "add" else b"MR.EXTEND"
        block = bytearray(128)
        block[:len(tag)] = tag
        block[16:24] = event[1].to_bytes(8, "little")
        stream.append(bytes(block) + (event[2] if event[0] == "extend" else b""))
    return hashlib.sha384(b"".join(stream)).hexdigest()


@pytest.fixture(scope="module")
def debian_tdx_firmware(sim):
    """Debian forky's TDX firmware, as its ovmf-inteltdx package installs it."""
    return sim.chroot / "usr/share/ovmf/OVMF.inteltdx.ms.fd"


@pytest.mark.parametrize("order", [SINGLE_PASS, TWO_PASS])
def test_mrtd_of_debians_tdx_firmware_matches_the_reference(debian_tdx_firmware, order):
    image = debian_tdx_firmware.read_bytes()
    value, sections = firmware_mrtd(debian_tdx_firmware, order)
    assert [tuple(vars(s).values()) for s in sections] == reference_sections(image)
    assert value == reference_mrtd(image, reference_sections(image), order == TWO_PASS)
    assert len(value) == 96


def test_debians_firmware_has_the_expected_layout(debian_tdx_firmware):
    sections = parse(debian_tdx_firmware.read_bytes())
    kinds = [s.kind for s in sections]
    assert kinds[0] == "BFV" and "CFV" in kinds and "TD_HOB" in kinds
    assert [s.kind for s in sections if s.attributes & 1] == ["BFV"]  # only code is extended
    bfv = sections[0]
    assert bfv.address + bfv.memory_size == 1 << 32  # the firmware ends at 4 GiB


def test_the_two_orders_give_different_values(debian_tdx_firmware):
    assert firmware_mrtd(debian_tdx_firmware, SINGLE_PASS)[0] != \
        firmware_mrtd(debian_tdx_firmware, TWO_PASS)[0]


def synthetic_firmware(bfv: bytes, extra_sections=()) -> bytes:
    """A small image laid out as OVMF's: BFV data, the TDVF descriptor, the GUIDed table."""
    import uuid

    sections = [(0, len(bfv), 0xFFFF0000 - len(bfv) + 0x10000 - 0x10000, len(bfv), 0, 1),
                *extra_sections]
    descriptor = struct.pack("<4sIII", b"TDVF", 16 + 32 * len(sections), 1, len(sections))
    descriptor += b"".join(struct.pack("<IIQQII", *s) for s in sections)
    body = bfv + descriptor
    entry_guid = uuid.UUID("e47a6535-984a-4798-865e-4685a7bf8ec2").bytes_le
    footer_guid = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d").bytes_le
    # offsets count from the end of the finished image: entry(22) + size(2) + guid(16) + 32
    tail = 22 + 18 + 32
    from_end = len(descriptor) + tail
    entry = struct.pack("<I", from_end) + struct.pack("<H", 22) + entry_guid
    table = entry + struct.pack("<H", 18 + len(entry)) + footer_guid
    return body + table + bytes(32)


def test_a_synthetic_image_with_an_augmented_and_a_zero_filled_section():
    bfv = bytes(range(256)) * 32  # two pages
    extra = [(0, 0, 0x800000, 0x2000, 3, 2),  # TempMem, PAGE.AUG: not added at all
             (0, 0, 0x810000, 0x1000, 2, 0)]  # TD_HOB: added, not extended
    image = synthetic_firmware(bfv, extra)
    sections = parse(image)
    assert [s.kind for s in sections] == ["BFV", "TempMem", "TD_HOB"]
    for order in (SINGLE_PASS, TWO_PASS):
        assert mrtd(image, sections, order).hex() == reference_mrtd(
            image, reference_sections(image), order == TWO_PASS)


def test_not_tdx_firmware_is_one_clear_error(tmp_path, sim):
    # (Debian's generic OVMF.fd carries TDVF metadata too: OvmfPkgX64 boots TDs as well.)
    not_firmware = sim.chroot / "usr/bin/qemu-system-x86_64"
    with pytest.raises(InputError, match="is not TDX firmware with TDVF metadata"):
        firmware_mrtd(not_firmware)
    with pytest.raises(InputError, match="cannot read firmware"):
        firmware_mrtd(tmp_path / "missing.fd")


@settings(max_examples=150, deadline=None)
@given(cut=st.integers(min_value=0, max_value=200), flip=st.integers(min_value=0, max_value=199))
def test_damaged_images_fail_cleanly(cut, flip):
    image = bytearray(synthetic_firmware(bytes(4096)))
    image[-1 - flip % len(image)] ^= 0xFF
    damaged = bytes(image[:len(image) - cut])
    try:
        parse(damaged)
    except InputError:
        pass


def test_measure_through_the_cli_on_the_emulated_host(sim, qemu_conn, debian_tdx_firmware):
    import json
    import uuid

    from click.testing import CliRunner

    from tdxvirt.cli import main

    name = f"m-{uuid.uuid4().hex[:8]}"
    runner = CliRunner()
    assert runner.invoke(main, ["--sim", "define", name, "--gpu", "38:00.0", "--allow-shared",
                                "--memory", "1G", "--vcpus", "1"]).exit_code == 0
    try:
        result = runner.invoke(main, ["--sim", "measure", name, "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert report["mrtd"] == firmware_mrtd(debian_tdx_firmware)[0]
        assert report["recorded"] == report["mrtd"]  # define predicted and recorded it
        assert report["rtmr0"].startswith("not predictable") and report["order"] == SINGLE_PASS
    finally:
        runner.invoke(main, ["--sim", "undefine", name])


def test_a_firmware_on_another_host_is_unknown_not_read_here(tmp_path):
    from tdxvirt.domain.measure import predict

    xml = "<domain><name>r</name><os><loader type='rom'>/usr/share/ovmf/X.fd</loader></os></domain>"
    asked = []
    result = predict(xml, lambda path: asked.append(path))  # a remote host: nothing readable
    assert result.mrtd is None and "--firmware FILE" in result.unknown and asked == ["/usr/share/ovmf/X.fd"]


def _crafted(sim, edit) -> bytes:
    """The real TDX firmware with its TDVF section table edited (each 32-byte section:
    DataOffset, RawDataSize, MemoryAddress at +8, MemoryDataSize at +16, Type, Attributes)."""
    import struct

    from tdxvirt.domain.tdvf import _metadata_offset

    image = bytearray((sim.chroot / "usr/share/ovmf/OVMF.inteltdx.ms.fd").read_bytes())
    start = _metadata_offset(bytes(image), "x")
    count = struct.unpack_from("<I", image, start + 12)[0]
    edit(image, start, count)
    return bytes(image)


def test_crafted_section_tables_are_refused_before_any_loop(sim, tmp_path):
    """The review's 4 KiB-style attack: a section of 2^52 bytes would loop for days; an
    oversized count, an overlap, a GPA past the TD's space: each one line, at once."""
    import struct
    import time

    def huge(image, start, count):
        struct.pack_into("<Q", image, start + 16 + 16, 1 << 51)  # section 0's MemoryDataSize

    def many(image, start, count):
        struct.pack_into("<I", image, start + 12, 10_000)
        struct.pack_into("<I", image, start + 4, 16 + 32 * 10_000)

    def overlap(image, start, count):
        address = struct.unpack_from("<Q", image, start + 16 + 32 + 8)[0]  # section 1's
        struct.pack_into("<Q", image, start + 16 + 8, address)  # section 0 placed on it

    def beyond(image, start, count):
        struct.pack_into("<Q", image, start + 16 + 8, (1 << 52) - 0x1000)  # section 0's address

    for edit, words in ((huge, "more than any TDX firmware"), (many, "10000 sections|more than the 64"),
                        (overlap, "overlap"), (beyond, "beyond a TD's guest-physical")):
        path = tmp_path / f"{edit.__name__}.fd"
        path.write_bytes(_crafted(sim, edit))
        started = time.monotonic()
        with pytest.raises(InputError, match=words):
            firmware_mrtd(path)
        assert time.monotonic() - started < 2, edit.__name__


def test_a_fifo_or_a_device_as_firmware_is_refused_at_once(tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo.fd")
    for special, kind in ((tmp_path / "fifo.fd", "a FIFO"), ("/dev/zero", "a character device")):
        with pytest.raises(InputError, match=f"is {kind}, not a regular file"):
            firmware_mrtd(special)
