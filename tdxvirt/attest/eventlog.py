"""The TD's CC event log (the ACPI CCEL table's log area) parsed and replayed into RTMRs.

Sources (read, not copied):
- TCG PC Client Platform Firmware Profile specification (PFP), section 10 "Event
  Logging": 10.2.1 TCG_PCClientPCREvent (the first, SHA-1-format event: PCRIndex u32,
  EventType u32, Digest[20], EventDataSize u32, Event), 10.4.5.1 TCG_EfiSpecIDEventStruct
  ("Spec ID Event03": platformClass u32, spec version 3 x u8, uintnSize u8,
  numberOfAlgorithms u32, {algorithmId u16, digestSize u16}, vendorInfoSize u8,
  vendorInfo), 10.2.2 TCG_PCR_EVENT2 (PCRIndex u32, EventType u32, TPML_DIGEST_VALUES:
  count u32, {hashAlg u16, digest}, EventSize u32, Event), 10.4.1 the event types
  (EV_NO_ACTION events are logged, never extended); all integers little-endian; a
  digest's size is the one the Spec ID event gives for its algorithm.
- UEFI specification 2.10, 38.4 EFI_CC_MEASUREMENT_PROTOCOL: the CC event log has the
  same layout with the PCR index replaced by the CC measurement register index; for
  Intel TDX (38.4.1) index 0 is MRTD, 1 RTMR[0], 2 RTMR[1], 3 RTMR[2] (and 4 RTMR[3],
  which the firmware does not use); 38.4.2 the CCEL ACPI table (LAML, LASA).
- edk2 OvmfPkg/IntelTdx/TdTcg2Dxe/TdTcg2Dxe.c (MapPcrToMrIndex, TdxHashLogExtendEvent:
  RTMR[MrIndex - 1] is extended with the event's SHA-384 digest, MRTD never is) and
  the TDX module ABI's TDG.MR.RTMR.EXTEND: RTMR = SHA-384(RTMR || 48-byte value), the
  register starting at 48 zero bytes.
- The log area is reserved whole and the firmware fills the unused part (0xFF in
  TDVF); what follows the last event is such fill.

Everything here is guest-controlled bytes: every length is checked against what is
left, counts are capped, and a malformed log is one EventLogFormatError line.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from ..textsafe import cap, safe
from . import EventLogFormatError

SHA1, SHA256, SHA384, SHA512, SM3_256 = 0x4, 0xB, 0xC, 0xD, 0x12  # TCG Algorithm Registry ids
KNOWN_SIZES = {SHA1: 20, SHA256: 32, SHA384: 48, SHA512: 64, SM3_256: 32}
SPEC_ID_SIGNATURE = b"Spec ID Event03\0"
REGISTERS = ("MRTD", "RTMR0", "RTMR1", "RTMR2", "RTMR3")  # CC MR index -> TDX register
RTMR_SIZE = 48
MAX_ALGORITHMS = 8  # the registry knows fewer digest algorithms than this
MAX_EVENTS = 10_000  # a firmware log holds tens to a few hundred events
MAX_EVENT_SIZE = 1024 * 1024
DESCRIPTION_LIMIT = 120

EV_NO_ACTION, EV_SEPARATOR, EV_EVENT_TAG = 0x3, 0x4, 0x6
EV_EFI_ACTION, EV_EFI_PLATFORM_FIRMWARE_BLOB2 = 0x80000007, 0x8000000A
# PFP 10.4.1, Table 9 "Events"
EVENT_TYPES = {
    0x0: "EV_PREBOOT_CERT", 0x1: "EV_POST_CODE", 0x2: "EV_UNUSED", 0x3: "EV_NO_ACTION",
    0x4: "EV_SEPARATOR", 0x5: "EV_ACTION", 0x6: "EV_EVENT_TAG", 0x7: "EV_S_CRTM_CONTENTS",
    0x8: "EV_S_CRTM_VERSION", 0x9: "EV_CPU_MICROCODE", 0xA: "EV_PLATFORM_CONFIG_FLAGS",
    0xB: "EV_TABLE_OF_DEVICES", 0xC: "EV_COMPACT_HASH", 0xD: "EV_IPL", 0xE: "EV_IPL_PARTITION_DATA",
    0xF: "EV_NONHOST_CODE", 0x10: "EV_NONHOST_CONFIG", 0x11: "EV_NONHOST_INFO",
    0x12: "EV_OMIT_BOOT_DEVICE_EVENTS", 0x13: "EV_POST_CODE2",
    0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG", 0x80000002: "EV_EFI_VARIABLE_BOOT",
    0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION", 0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
    0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER", 0x80000006: "EV_EFI_GPT_EVENT",
    0x80000007: "EV_EFI_ACTION", 0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES", 0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    0x8000000B: "EV_EFI_HANDOFF_TABLES2", 0x8000000C: "EV_EFI_VARIABLE_BOOT2",
    0x80000010: "EV_EFI_HCRTM_EVENT", 0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
    0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB", 0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
}


def type_name(kind: int) -> str:
    return EVENT_TYPES.get(kind, f"{kind:#010x}")


@dataclass(frozen=True)
class CcEvent:
    number: int  # its position in the log, the Spec ID event being 0
    index: int  # CC measurement register index (0 MRTD, 1..4 RTMR0..3)
    kind: int
    digests: dict  # algorithm id -> digest bytes
    data: bytes

    @property
    def register(self) -> str | None:
        return REGISTERS[self.index] if self.index < len(REGISTERS) else None

    @property
    def rtmr(self) -> int | None:
        """The RTMR this event extends, or None: MRTD is built by the TDX module, not
        extended; EV_NO_ACTION is logged only."""
        if self.kind == EV_NO_ACTION or not 1 <= self.index <= 4:
            return None
        return self.index - 1

    def description(self) -> str | None:
        """What the log says the event is, escaped: only for the types whose data is a
        label (EV_EFI_ACTION's string, EV_EVENT_TAG's tagged data, EV_SEPARATOR's value,
        EV_EFI_PLATFORM_FIRMWARE_BLOB2's description)."""
        data = self.data
        if self.kind == EV_EFI_ACTION:
            return _label(data)
        if self.kind == EV_SEPARATOR:
            return f"separator {data.hex()}" if len(data) <= 8 else f"separator of {len(data)} bytes"
        if self.kind == EV_EVENT_TAG and len(data) >= 8:
            tag, size = struct.unpack_from("<II", data)  # PFP 10.4.2 TCG_PCClientTaggedEvent
            return f"tag {tag:#x}: {_label(data[8:8 + size])}"
        if self.kind == EV_EFI_PLATFORM_FIRMWARE_BLOB2 and data:
            return _label(data[1:1 + data[0]])  # PFP 10.4.4 UEFI_PLATFORM_FIRMWARE_BLOB2
        return None

    def as_dict(self) -> dict:
        digest = self.digests.get(SHA384)
        return {"number": self.number, "register": self.register, "index": self.index,
                "type": type_name(self.kind), "digest": digest.hex() if digest else None,
                "description": self.description()}


def _label(data: bytes) -> str:
    """Escaped here, not only by a printer: a relying party reading the JSON may print
    it raw, and a guest's label must not act on its terminal either."""
    return cap(safe(data.rstrip(b"\0").decode("utf-8", errors="replace")), DESCRIPTION_LIMIT)


@dataclass(frozen=True)
class EventLog:
    algorithms: dict  # algorithm id -> digest size, from the Spec ID event
    events: tuple[CcEvent, ...]  # after the Spec ID event
    size: int  # bytes up to the end of the last event (fill after it excluded)

    def extending(self, rtmr: int) -> list[CcEvent]:
        return [event for event in self.events if event.rtmr == rtmr]

    def replay(self) -> tuple[bytes, bytes, bytes, bytes]:
        """RTMR0..3 as the log's events extend them from 48 zero bytes."""
        registers = [bytes(RTMR_SIZE)] * 4
        for event in self.events:
            if event.rtmr is not None:
                registers[event.rtmr] = hashlib.sha384(registers[event.rtmr] + event.digests[SHA384]).digest()
        return tuple(registers)


class _Reader:
    def __init__(self, raw: bytes):
        self.raw, self.at = raw, 0
        self.fill_from = len(raw.rstrip(b"\x00\xff"))  # once: a scan per event would be quadratic

    def take(self, size: int, what: str) -> bytes:
        if size > len(self.raw) - self.at:
            raise EventLogFormatError(f"the CC event log is truncated: {what} needs {size} bytes at offset "
                                      f"{self.at}, {len(self.raw) - self.at} are left")
        data = self.raw[self.at:self.at + size]
        self.at += size
        return data

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u16(self, what: str) -> int:
        return struct.unpack("<H", self.take(2, what))[0]

    def only_fill_left(self) -> bool:
        return self.at >= self.fill_from


def _spec_id(reader: _Reader) -> dict:
    """PFP 10.2.1 and 10.4.5.1: the SHA-1-format first event and its algorithm table."""
    reader.take(4, "the first event's index")
    if reader.u32("the first event's type") != EV_NO_ACTION:
        raise EventLogFormatError("the CC event log does not start with the Spec ID event (EV_NO_ACTION): "
                                  "not a crypto-agile TCG event log")
    reader.take(20, "the first event's SHA-1 digest")
    size = reader.u32("the Spec ID event's size")
    event = _Reader(reader.take(size, "the Spec ID event"))
    if event.take(16, "the Spec ID signature") != SPEC_ID_SIGNATURE:
        raise EventLogFormatError("the CC event log's first event is not \"Spec ID Event03\": "
                                  "not a crypto-agile TCG event log")
    event.take(8, "the Spec ID event's platform class and versions")
    count = event.u32("the Spec ID event's algorithm count")
    if not 1 <= count <= MAX_ALGORITHMS:
        raise EventLogFormatError(f"the CC event log's Spec ID event names {count} digest algorithms "
                                  f"(1 to {MAX_ALGORITHMS} is a log)")
    algorithms = {}
    for _ in range(count):
        algorithm, digest_size = event.u16("an algorithm id"), event.u16("a digest size")
        if algorithm in KNOWN_SIZES and digest_size != KNOWN_SIZES[algorithm]:
            raise EventLogFormatError(f"the CC event log's Spec ID event gives algorithm {algorithm:#x} "
                                      f"{digest_size}-byte digests; they are {KNOWN_SIZES[algorithm]} bytes")
        if not 1 <= digest_size <= 64:
            raise EventLogFormatError(f"the CC event log's Spec ID event gives algorithm {algorithm:#x} "
                                      f"{digest_size}-byte digests, which no digest algorithm has")
        algorithms[algorithm] = digest_size
    if SHA384 not in algorithms:
        raise EventLogFormatError("the CC event log has no SHA-384 digests, which the RTMRs are made of")
    return algorithms


def _event(reader: _Reader, number: int, algorithms: dict) -> CcEvent:
    """PFP 10.2.2 TCG_PCR_EVENT2, with the CC measurement register index for PCRIndex."""
    where = f"event {number}"
    index, kind = reader.u32(f"{where}'s index"), reader.u32(f"{where}'s type")
    count = reader.u32(f"{where}'s digest count")
    if count > len(algorithms):
        raise EventLogFormatError(f"the CC event log's {where} has {count} digests; the log has "
                                  f"{len(algorithms)} algorithms")
    digests = {}
    for _ in range(count):
        algorithm = reader.u16(f"{where}'s digest algorithm")
        if algorithm not in algorithms or algorithm in digests:
            raise EventLogFormatError(f"the CC event log's {where} has a digest of algorithm {algorithm:#x}, "
                                      "which its Spec ID event does not name (or twice)")
        digests[algorithm] = reader.take(algorithms[algorithm], f"{where}'s digest")
    size = reader.u32(f"{where}'s data size")
    if size > MAX_EVENT_SIZE:
        raise EventLogFormatError(f"the CC event log's {where} declares {size} bytes of data "
                                  f"(more than {MAX_EVENT_SIZE}): not an event")
    event = CcEvent(number, index, kind, digests, reader.take(size, f"{where}'s data"))
    if event.kind != EV_NO_ACTION and index >= len(REGISTERS):
        raise EventLogFormatError(f"the CC event log's {where} names measurement register index {index}; "
                                  "a TD has 0 (MRTD) to 4 (RTMR3)")
    if event.rtmr is not None and SHA384 not in digests:
        raise EventLogFormatError(f"the CC event log's {where} extends RTMR{event.rtmr} without a SHA-384 digest")
    return event


def parse_event_log(raw: bytes) -> EventLog:
    """The log's events; EventLogFormatError (one line) for anything that is not one.
    The log ends where only fill (0x00/0xFF bytes) is left."""
    reader = _Reader(bytes(raw))
    if not reader.raw or reader.only_fill_left():
        raise EventLogFormatError("the CC event log is empty")
    algorithms = _spec_id(reader)
    events = []
    while not reader.only_fill_left():
        if len(events) == MAX_EVENTS:
            raise EventLogFormatError(f"the CC event log has more than {MAX_EVENTS} events: not a firmware's log")
        events.append(_event(reader, len(events) + 1, algorithms))
    return EventLog(algorithms, tuple(events), reader.at)
