"""A TD's firmware (TDVF) metadata, and the MRTD the TDX module will compute from it.

Sources (section numbers as in the documents named):
- Intel TDX Virtual Firmware Design Guide, §11 "TDVF metadata": the image carries a
  TDVF_DESCRIPTOR ("TDVF", length, version 1, number of sections) followed by
  TDVF_SECTION entries of 32 bytes (DataOffset, RawDataSize, MemoryAddress,
  MemoryDataSize, Type, Attributes); attribute bit 0 MR.EXTEND, bit 1 PAGE.AUG.
  OVMF locates the descriptor through the GUIDed table that ends 32 bytes before the
  end of the image (edk2 OvmfPkg/ResetVector/Ia16/ResetVectorVtf0.asm: footer GUID
  96b582de-..., a 16-bit table length before it; each entry is data, a 16-bit
  length, then its GUID, walked backwards); the entry e47a6535-... holds the
  descriptor's offset counted from the end of the image (IntelTdxMetadata.asm).
- Intel TDX Module ABI / Base Architecture Specification, TDH.MEM.PAGE.ADD and
  TDH.MR.EXTEND: MRTD is one SHA-384 computation over 128-byte extension buffers:
  for each page added, "MEM.PAGE.ADD" (12 bytes) then the page's GPA at byte 16; for
  each 256-byte chunk extended, "MR.EXTEND" (9 bytes), the chunk's GPA at byte 16,
  then the 256 bytes themselves. TDH.MR.FINALIZE ends the hash.
- The host's order: QEMU adds every section without PAGE.AUG (target/i386/kvm/tdx.c,
  KVM_TDX_INIT_MEM_REGION with KVM_TDX_MEASURE_MEMORY_REGION when MR.EXTEND is set);
  upstream KVM (Linux >= 6.16, arch/x86/kvm/vmx/tdx.c) adds each page and then
  extends that page's 16 chunks before the next page ("single pass"). Some earlier,
  out-of-tree stacks added all of a section's pages first ("two pass"); both orders
  are offered, and the one used is always named with the value.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
METADATA_OFFSET_GUID = uuid.UUID("e47a6535-984a-4798-865e-4685a7bf8ec2")
BYTES_AFTER_FOOTER = 32
PAGE = 0x1000
CHUNK = 0x100
MR_EXTEND = 0x1
PAGE_AUG = 0x2
SECTION_TYPES = {0: "BFV", 1: "CFV", 2: "TD_HOB", 3: "TempMem", 4: "PermMem", 5: "Payload",
                 6: "PayloadParam"}
SINGLE_PASS, TWO_PASS = "single-pass", "two-pass"
# Bounds a crafted image cannot stretch (a TDVF adds and measures a few MiB, in a
# handful of sections): checked before any loop runs over the sections' pages.
MAX_SECTIONS = 64
MAX_MEASURED_BYTES = 512 << 20
GPA_LIMIT = 1 << 52
FIRMWARE_LIMIT = 256 << 20  # bytes read of a firmware file


@dataclass(frozen=True)
class Section:
    data_offset: int
    raw_size: int
    address: int
    memory_size: int
    type: int
    attributes: int

    @property
    def kind(self) -> str:
        return SECTION_TYPES.get(self.type, f"type {self.type}")


def _bad(path: str, why: str) -> InputError:
    return InputError(f"{path} is not TDX firmware with TDVF metadata ({why}); give the "
                      "TD's firmware image (OVMF built for TDX, e.g. OVMF.inteltdx.fd)")


def _metadata_offset(image: bytes, path: str) -> int:
    end = len(image) - BYTES_AFTER_FOOTER
    if end < 18 or uuid.UUID(bytes_le=image[end - 16:end]) != FOOTER_GUID:
        raise _bad(path, "no OVMF GUIDed table footer")
    (table_size,) = struct.unpack_from("<H", image, end - 18)
    if not 18 <= table_size <= end - 18:
        raise _bad(path, "implausible GUIDed table size")
    table = image[end - 18 - table_size:end - 18]
    cursor = len(table)
    while cursor >= 18:
        guid = uuid.UUID(bytes_le=table[cursor - 16:cursor])
        (entry_size,) = struct.unpack_from("<H", table, cursor - 18)
        if entry_size < 18 or entry_size > cursor:
            raise _bad(path, "a GUIDed table entry with an implausible size")
        if guid == METADATA_OFFSET_GUID:
            (from_end,) = struct.unpack_from("<I", table, cursor - 22)
            return len(image) - from_end
        cursor -= entry_size
    raise _bad(path, "no TDX metadata entry in its GUIDed table")


def parse(image: bytes, path: str = "the firmware") -> list[Section]:
    """The TDVF sections of a firmware image, checked as the design guide requires."""
    start = _metadata_offset(image, path)
    if not 0 <= start <= len(image) - 16:
        raise _bad(path, "metadata offset outside the image")
    signature, length, version, count = struct.unpack_from("<4sIII", image, start)
    if signature != b"TDVF" or version != 1 or length != 16 + 32 * count \
            or start + length > len(image):
        raise _bad(path, f"descriptor {signature!r} version {version} with {count} sections")
    if count > MAX_SECTIONS:
        raise _bad(path, f"{count} sections, more than the {MAX_SECTIONS} any TDVF has")
    sections = [Section(*struct.unpack_from("<IIQQII", image, start + 16 + 32 * i))
                for i in range(count)]
    for s in sections:
        if s.address % PAGE or s.memory_size % PAGE or s.raw_size > s.memory_size \
                or s.data_offset + s.raw_size > len(image):
            raise _bad(path, f"{s.kind} section at {s.address:#x} is not page-aligned or "
                             "points outside the image")
        if s.address + s.memory_size > GPA_LIMIT:
            raise _bad(path, f"{s.kind} section at {s.address:#x} of {s.memory_size:#x} bytes ends "
                             "beyond a TD's guest-physical address space")
    measured = sum(s.memory_size for s in sections
                   if not s.attributes & PAGE_AUG or s.attributes & MR_EXTEND)
    if measured > MAX_MEASURED_BYTES:
        raise _bad(path, f"its sections add {measured:#x} bytes to the TD, more than any TDX "
                         f"firmware ({MAX_MEASURED_BYTES >> 20} MiB)")
    placed = sorted((s for s in sections if s.memory_size), key=lambda s: s.address)
    for before, after in zip(placed, placed[1:]):
        if before.address + before.memory_size > after.address:
            raise _bad(path, f"its {before.kind} and {after.kind} sections overlap at {after.address:#x}")
    return sections


def mrtd(image: bytes, sections: list[Section], order: str = SINGLE_PASS) -> bytes:
    """The MRTD (48 bytes) the TDX module computes when the host loads this firmware."""
    digest = hashlib.sha384()

    def page_add(s: Section, page: int) -> None:
        if not s.attributes & PAGE_AUG:
            digest.update(b"MEM.PAGE.ADD".ljust(16, b"\0")
                          + struct.pack("<Q", s.address + page * PAGE).ljust(112, b"\0"))

    def extend(s: Section, page: int) -> None:
        if not s.attributes & MR_EXTEND:
            return
        for chunk in range(PAGE // CHUNK):
            offset = page * PAGE + chunk * CHUNK
            data = image[s.data_offset + offset:s.data_offset + min(offset + CHUNK, s.raw_size)] \
                if offset < s.raw_size else b""
            digest.update(b"MR.EXTEND".ljust(16, b"\0")
                          + struct.pack("<Q", s.address + offset).ljust(112, b"\0"))
            digest.update(data.ljust(CHUNK, b"\0"))  # pages past the raw data are zero

    for s in sections:
        pages = range(s.memory_size // PAGE)
        if order == TWO_PASS:
            for page in pages:
                page_add(s, page)
            for page in pages:
                extend(s, page)
        else:
            for page in pages:
                page_add(s, page)
                extend(s, page)
    return digest.digest()


_PREDICTED: dict[tuple, str | None] = {}


_CACHE_KIND = "mrtd-v1"  # a change to how MRTD is computed needs a new kind


def predicted_mrtd(path: str | Path) -> str | None:
    """The single-pass MRTD of a firmware file, or None when it is not TDX firmware or
    cannot be read (define records what it can; `measure` says why). Remembered per
    file, size and modification time within a process, and across runs by the file's
    SHA-256 (tdxvirt.cache): the bytes are read every time, only the hashing is saved."""
    from .. import cache

    try:
        status = Path(path).stat()
    except OSError:
        return None
    key = (str(path), status.st_size, status.st_mtime_ns)
    if key not in _PREDICTED:
        try:
            image = _read_firmware(path)
        except InputError:
            _PREDICTED[key] = None
            return None
        digest = hashlib.sha256(image).hexdigest()
        stored = cache.read(_CACHE_KIND, digest)
        if stored is not None and _is_mrtd_hex(stored):
            _PREDICTED[key] = stored.decode()
        else:
            try:
                _PREDICTED[key] = mrtd(image, parse(image, str(path)), SINGLE_PASS).hex()
            except InputError:
                _PREDICTED[key] = None
                return None
            cache.write(_CACHE_KIND, digest, _PREDICTED[key].encode())
    return _PREDICTED[key]


def _is_mrtd_hex(value: bytes) -> bool:
    return len(value) == 96 and all(c in b"0123456789abcdef" for c in value)


def firmware_mrtd(path: str | Path, order: str = SINGLE_PASS) -> tuple[str, list[Section]]:
    """(MRTD as hex, sections) of a firmware file: a regular file (a FIFO or /dev/zero is
    refused before a byte is read), at most FIRMWARE_LIMIT bytes."""
    image = _read_firmware(path)
    sections = parse(image, str(path))
    return mrtd(image, sections, order).hex(), sections


def _read_firmware(path: str | Path) -> bytes:
    from ..errors import NotFoundError
    from ..userfile import read_user_file

    hint = "give the path of the TD's firmware image (its <os><loader>, or a copy of it)"
    try:
        return read_user_file(path, "firmware", hint, limit=FIRMWARE_LIMIT)
    except NotFoundError:
        raise InputError(f"cannot read firmware {path}: it does not exist; {hint}") from None
