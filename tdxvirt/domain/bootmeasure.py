"""RTMR1 and RTMR2 of a directly booted TD: the events TDVF and the kernel's EFI stub measure.

A TD's RTMRs start at zero; each measurement extends one with a SHA-384 digest
(TDX module spec, TDG.MR.RTMR.EXTEND: RTMR = SHA384(RTMR || digest)). UEFI 2.10
section 38.4.1 maps the TCG PCRs onto CC measurement registers: PCR 2-6 -> RTMR1,
PCR 8-15 -> RTMR2 (edk2 TdxMeasurementMapPcrToMrIndex). For a kernel QEMU hands to the
firmware (libvirt's <kernel>, <initrd>, <cmdline>) the sequence is, in order:

RTMR1 (read from edk2, cited by file; checked on a real boot, docs/measurements.md):
  1. the kernel image: EV_EFI_BOOT_SERVICES_APPLICATION (PCR 4), the PE/COFF
     Authenticode SHA-384 of the file. OvmfPkg/Library/PlatformBootManagerLib/QemuKernel.c
     loads it (gBS->LoadImage) before signalling ReadyToBoot;
     SecurityPkg/Library/DxeTpm2MeasureBootLib measures it; OvmfPkg/Tcg/TdTcg2Dxe/
     MeasureBootPeCoff.c hashes it. QEMU gives a confidential guest's firmware the file
     unchanged (hw/i386/x86-common.c x86_load_linux patches the setup header only
     without confidential-guest-support; current QEMU (read: 11.1) also offers the
     unpatched file as etc/boot/kernel, which edk2-stable202502 and later prefer).
  2. EV_EFI_ACTION "Calling EFI Application from Boot Option" (PCR 4), and
  3. EV_SEPARATOR 00000000, to RTMR1 only: TdTcg2Dxe.c OnReadyToBoot, first boot attempt.
  4. EV_EFI_ACTION "Exit Boot Services Invocation" and
  5. "Exit Boot Services Returned with Success" (PCR 5): TdTcg2Dxe.c OnExitBootServices.
RTMR2 (Linux drivers/firmware/efi/libstub/efi-stub-helper.c, efi_measure_tagged_event,
EV_EVENT_TAG into PCR 9; into the CC protocol when there is no TCG2 protocol, Linux >= 6.9):
  1. "LOADED_IMAGE::LoadOptions": the raw LoadOptions buffer the firmware built
     (OvmfPkg/Library/X86QemuLoadImageLib QemuLoadKernelImage: the command line widened
     byte by byte to UTF-16, "initrd=initrd " before it (edk2-stable202508 and later) or
     " initrd=initrd" after it (before) when there is an initrd, NUL-terminated);
  2. "Linux initrd": SHA-384 of the initrd, which the stub reads through
     LINUX_EFI_INITRD_MEDIA_GUID's LoadFile2 (OvmfPkg/QemuKernelLoaderFsDxe).
"""

from __future__ import annotations

import hashlib
import lzma
import re
import struct
import uuid
from dataclasses import asdict, dataclass

from ..errors import InputError

DIGEST_SIZE = 48
CALLING = "Calling EFI Application from Boot Option"
EBS_INVOCATION = "Exit Boot Services Invocation"
EBS_SUCCESS = "Exit Boot Services Returned with Success"
SEPARATOR = bytes(4)
# edk2's LZMA-compressed section GUID (MdeModulePkg LzmaCustomDecompressLib).
LZMA_SECTION = uuid.UUID("ee4e5898-3914-4259-9d6e-dc7bd79403cf").bytes_le
EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c").bytes_le
# The literals X86QemuLoadImageLib formats LoadOptions with (commit a2ac0fea49 moved it).
INITRD_PREFIX, INITRD_SUFFIX = b"initrd=initrd \0", b" initrd=initrd\0"
# Linux's first release whose EFI stub measures into the CC protocol (TDX) when there is no
# TCG2 protocol ("efi/libstub: Measure into CC protocol if TCG2 protocol is absent").
STUB_CC_SINCE = (6, 9)


@dataclass(frozen=True)
class Event:
    register: str  # RTMR1 or RTMR2
    pcr: int  # the TCG PCR the code measures into, mapped onto the register
    type: str
    digest: str  # 96 hex digits
    what: str

    def as_dict(self) -> dict:
        return asdict(self)


def sha384(data: bytes) -> str:
    return hashlib.sha384(data).hexdigest()


def replay(digests: list[str]) -> str:
    """The register after extending zero with each digest in turn."""
    value = bytes(DIGEST_SIZE)
    for digest in digests:
        value = hashlib.sha384(value + bytes.fromhex(digest)).digest()
    return value.hex()


def authenticode_sha384(image: bytes) -> str:
    """The PE/COFF image hash of Microsoft's "Windows Authenticode Portable Executable
    Signature Format" (section "Calculating the PE Image Hash"), as edk2's
    MeasureBootPeCoff.c computes it: the headers without the checksum and the certificate
    table entry, the sections in file order, then what follows them but the certificates."""
    try:
        return _authenticode(image)
    except struct.error:
        raise InputError("the kernel's PE/COFF headers are truncated: tdxvirt predicts RTMR1 "
                         "only for a kernel with an EFI stub; use such a kernel") from None


def _authenticode(image: bytes) -> str:
    not_pe = ("the kernel is not a PE/COFF image: tdxvirt predicts RTMR1 only for a kernel "
              "with an EFI stub; use such a kernel")
    if image[:2] != b"MZ":
        raise InputError(not_pe)
    pe = struct.unpack_from("<I", image, 0x3C)[0]
    if image[pe:pe + 4] != b"PE\0\0":
        raise InputError(not_pe)
    sections, optional_size = struct.unpack_from("<H12xH", image, pe + 6)
    optional = pe + 24
    magic = struct.unpack_from("<H", image, optional)[0]
    if magic not in (0x10B, 0x20B):  # PE32, PE32+
        raise InputError(not_pe)
    checksum = optional + 64
    directories = optional + (96 if magic == 0x10B else 112)
    count = struct.unpack_from("<I", image, directories - 4)[0]
    headers = struct.unpack_from("<I", image, optional + 60)[0]
    digest = hashlib.sha384(image[:checksum])
    certificates = 0
    if count > 4:  # the certificate table is data directory 4
        entry = directories + 4 * 8
        digest.update(image[checksum + 4:entry])
        digest.update(image[entry + 8:headers])
        certificates = struct.unpack_from("<I", image, entry + 4)[0]
    else:
        digest.update(image[checksum + 4:headers])
    hashed = headers
    table = optional + optional_size
    # each section header: SizeOfRawData at 16, PointerToRawData at 20; hashed in file order
    ranges = [struct.unpack_from("<II", image, table + 40 * i + 16) for i in range(sections)]
    for size, offset in sorted(ranges, key=lambda r: r[1]):
        if size:
            digest.update(image[offset:offset + size])
            hashed += size
    if len(image) > hashed + certificates:
        digest.update(image[hashed:len(image) - certificates])
    return digest.hexdigest()


# An OVMF DXE volume decompresses to some MiB; more from one section is not firmware,
# and an LZMA header may claim any size (a "bomb" in a damaged --firmware file).
VOLUME_LIMIT = 64 * 1024 * 1024


def _decompressed_volumes(firmware: bytes):
    """Each LZMA-compressed GUIDed section of the image, decompressed (where OVMF keeps
    its DXE drivers: the PI spec's EFI_GUID_DEFINED_SECTION around FVMAIN). The image
    may be any file (--firmware): a section header that does not fit, or data that does
    not decompress, is skipped, so a damaged image yields fewer volumes, never an error.
    EFI_COMMON_SECTION_HEADER is Size (3 bytes) and Type (0x02: GUID-defined), then the
    GUID (16 bytes), DataOffset (2 bytes, from the section's start) and Attributes."""
    at = firmware.find(LZMA_SECTION)
    while at != -1:
        header = at - 4
        size = int.from_bytes(firmware[header:header + 3], "little") if header >= 0 else 0
        if (header >= 0 and firmware[header + 3] == 0x02 and size not in (0, 0xFFFFFF)
                and at + 18 <= len(firmware)):
            offset = struct.unpack_from("<H", firmware, at + 16)[0]
            if 20 <= offset < size:  # the data starts after the 20-byte GUID-defined header
                try:
                    yield lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(
                        firmware[header + offset:header + size], max_length=VOLUME_LIMIT)
                except (lzma.LZMAError, EOFError):
                    pass
        at = firmware.find(LZMA_SECTION, at + 1)


def initrd_option_placement(firmware: bytes) -> str | None:
    """'prefix' or 'suffix': where this firmware build puts "initrd=initrd" in the kernel's
    LoadOptions; None when the image does not tell."""
    for volume in _decompressed_volumes(firmware):
        prefix, suffix = INITRD_PREFIX in volume, INITRD_SUFFIX in volume
        if prefix != suffix:
            return "prefix" if prefix else "suffix"
    return None


def secure_boot_keys_enrolled(firmware: bytes) -> bool:
    """Whether the image's embedded variable store holds a platform key (PK): such a
    firmware starts only a kernel its db trusts (Debian's OVMF.inteltdx.ms.fd does).
    An authenticated variable header (edk2 MdeModulePkg/Include/Guid/VariableFormat.h)
    is 60 bytes: StartId 0x55AA, State, ..., NameSize at 36, VendorGuid at 44."""
    at = firmware.find(b"P\0K\0\0\0")
    while at != -1:
        header = at - 60
        if (header >= 0 and firmware[header:header + 2] == b"\xaa\x55" and firmware[header + 2] == 0x3F
                and struct.unpack_from("<I", firmware, header + 36)[0] == 6
                and firmware[header + 44:header + 60] == EFI_GLOBAL_VARIABLE):
            return True
        at = firmware.find(b"P\0K\0\0\0", at + 1)
    return False


def authenticode_signed(image: bytes) -> bool | None:
    """Whether a PE/COFF image carries Authenticode signatures (a non-empty certificate
    table, data directory 4); None when it is not a PE/COFF image."""
    try:
        if image[:2] != b"MZ":
            return None
        pe = struct.unpack_from("<I", image, 0x3C)[0]
        if image[pe:pe + 4] != b"PE\0\0":
            return None
        optional = pe + 24
        magic = struct.unpack_from("<H", image, optional)[0]
        if magic not in (0x10B, 0x20B):
            return None
        directories = optional + (96 if magic == 0x10B else 112)
        if struct.unpack_from("<I", image, directories - 4)[0] <= 4:
            return False
        return struct.unpack_from("<I", image, directories + 4 * 8 + 4)[0] > 0
    except struct.error:
        return None


def secure_boot_problem(firmware: bytes, kernel: bytes, firmware_path: str, kernel_path: str
                        ) -> tuple[str | None, str | None]:
    """(why a directly booted kernel cannot boot, a warning) on a firmware that enforces
    Secure Boot with enrolled keys: an unsigned kernel is refused outright by it; a
    signed one boots only if its signer is in the firmware's db (Debian's kernels are
    signed for shim, not for Microsoft's db, which Debian's OVMF.inteltdx.ms.fd holds)."""
    if not secure_boot_keys_enrolled(firmware):
        return None, None
    signed = authenticode_signed(kernel)
    if signed is False:
        return (f"the firmware {firmware_path} enforces Secure Boot with enrolled keys and the "
                f"kernel {kernel_path} is not signed: the firmware would refuse to start it; give "
                "--ovmf with a TDX firmware without enrolled keys (`tdxvirt build` makes one)"), None
    if signed:
        return None, (f"the firmware {firmware_path} enforces Secure Boot with enrolled keys: the "
                      f"signed kernel {kernel_path} starts only if its signer is in that firmware's "
                      "db (a distribution kernel signed for shim is not); a TDX firmware without "
                      "enrolled keys (--ovmf) boots any kernel")
    return None, None


def kernel_version(image: bytes) -> tuple[int, int] | None:
    """(major, minor) from the x86 boot protocol header's kernel_version string
    (Documentation/arch/x86/boot.rst: "HdrS" at 0x202, the pointer at 0x20e, +0x200)."""
    if image[0x202:0x206] != b"HdrS" or len(image) < 0x210:
        return None
    pointer = struct.unpack_from("<H", image, 0x20E)[0]
    if not pointer:
        return None
    match = re.match(rb"(\d+)\.(\d+)", image[pointer + 0x200:pointer + 0x240])
    return (int(match[1]), int(match[2])) if match else None


def load_options(cmdline: str, initrd: bool, placement: str | None) -> bytes:
    """The LoadOptions buffer X86QemuLoadImageLib gives the kernel. QEMU passes the command
    line as bytes (UTF-8 from libvirt); UnicodeSPrintAsciiFormat widens each byte to one
    UTF-16 unit. Empty when there is neither a command line nor an initrd (then unmeasured)."""
    text = cmdline.encode()
    if initrd:
        text = b"initrd=initrd " + text if placement == "prefix" else text + b" initrd=initrd"
    if not text:
        return b""
    return text.decode("latin-1").encode("utf-16-le") + b"\0\0"


KERNEL_LIMIT = 256 << 20
INITRD_LIMIT = 4 << 30


def file_sha384(path, limit: int = INITRD_LIMIT) -> str:
    """SHA-384 of a regular file (a FIFO or a device raises OSError before a byte is read;
    so does a file larger than ``limit``), read in blocks."""
    import errno
    import os
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as stream:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if status.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit >> 20} MiB")
        digest, total = hashlib.sha384(), 0
        for block in iter(lambda: stream.read(1 << 20), b""):
            total += len(block)
            if total > limit:
                raise OSError(errno.EFBIG, f"larger than {limit >> 20} MiB")
            digest.update(block)
    return digest.hexdigest()


def rtmr1_events(kernel_digest: str) -> list[Event]:
    return [Event("RTMR1", 4, "EV_EFI_BOOT_SERVICES_APPLICATION", kernel_digest,
                  "the kernel image (PE/COFF Authenticode SHA-384)"),
            Event("RTMR1", 4, "EV_EFI_ACTION", sha384(CALLING.encode()), CALLING),
            Event("RTMR1", 4, "EV_SEPARATOR", sha384(SEPARATOR), "separator 00000000"),
            Event("RTMR1", 5, "EV_EFI_ACTION", sha384(EBS_INVOCATION.encode()), EBS_INVOCATION),
            Event("RTMR1", 5, "EV_EFI_ACTION", sha384(EBS_SUCCESS.encode()), EBS_SUCCESS)]


def stub_skips_initrd(cmdline: str) -> bool:
    """The EFI stub's own option parser (drivers/firmware/efi/libstub/efi-stub-helper.c,
    efi_parse_options: the kernel's next_arg, double quotes group, "--" ends the stub's
    options) sets efi_noinitrd for ``noinitrd``: then it loads, and measures, no initrd."""
    import shlex

    try:
        words = shlex.split(cmdline, posix=True)
    except ValueError:  # an unbalanced quote: the kernel's next_arg takes the rest as one word
        words = cmdline.split()
    for word in words:
        if word == "--":
            return False
        if word == "noinitrd":
            return True
    return False


def rtmr2_events(options: bytes, initrd_digest: str | None) -> list[Event]:
    events = []
    if options:
        events.append(Event("RTMR2", 9, "EV_EVENT_TAG", sha384(options),
                            "LOADED_IMAGE::LoadOptions (the kernel command line, UTF-16)"))
    if initrd_digest:
        events.append(Event("RTMR2", 9, "EV_EVENT_TAG", initrd_digest, "Linux initrd"))
    return events


@dataclass(frozen=True)
class BootPrediction:
    rtmr1: str  # 96 hex digits, or a sentence saying why not
    rtmr2: str
    events: list[Event]
    assumptions: list[str]


ASSUMED = [
    "the values hold when the kernel starts; what the running guest extends later (IMA, "
    "writes to the TSM measurement registers) comes on top",
    "the firmware starts the kernel at its first boot attempt, with no other boot option "
    "and no option ROM run before it",
]


def _read(path, what: str) -> bytes | str:
    """The file (a regular file, at most KERNEL_LIMIT bytes), or a sentence saying why not."""
    from ..errors import TdxvirtError
    from ..userfile import read_user_file

    try:
        return read_user_file(path, f"the {what}", limit=KERNEL_LIMIT)
    except TdxvirtError as error:
        return f"not predicted: {error}"


# QEMU before 10.2 patches the kernel's setup header (boot_params fields it fills in)
# in the image it hands the firmware, and the firmware measures that patched image;
# QEMU 10.2 adds the unpatched kernel (fw_cfg etc/boot/kernel), which edk2 >= 202502
# measures. tdxvirt models only the unpatched kernel.
UNPATCHED_KERNEL_QEMU = (10, 2, 0)


def predict_direct_boot(kernel_path, initrd_path, cmdline: str, firmware: bytes | None,
                 option_roms: list[str], qemu_version: tuple[int, int, int] | None = None
                 ) -> BootPrediction:
    """RTMR1/RTMR2 for QEMU direct kernel boot of local copies of the TD's files.

    ``firmware`` is the image's bytes, or None when it cannot be read here; ``option_roms``
    names the devices whose option ROM the firmware would run (each is measured into RTMR1
    as EV_EFI_BOOT_SERVICES_DRIVER, and tdxvirt cannot know its image); ``qemu_version``,
    the host's QEMU when known (before 10.2 RTMR1 is not predicted)."""
    assumptions = list(ASSUMED)
    kernel = _read(kernel_path, "kernel")
    if isinstance(kernel, str):
        return BootPrediction(kernel, kernel, [], assumptions)
    try:
        kernel_digest = authenticode_sha384(kernel)
    except InputError as error:
        why = f"not predicted: {error}"
        return BootPrediction(why, why, [], assumptions)
    events1 = rtmr1_events(kernel_digest)
    if option_roms:
        rtmr1 = ("not predictable while the firmware runs option ROMs, each measured into RTMR1 "
                 f"before the kernel ({', '.join(option_roms)}): give each <rom enabled='no'/>")
    elif qemu_version is not None and qemu_version < UNPATCHED_KERNEL_QEMU:
        shown_qemu = ".".join(map(str, qemu_version))
        rtmr1 = (f"not predicted: QEMU {shown_qemu} (< 10.2) patches the kernel's setup header before "
                 "the firmware measures it, and tdxvirt predicts only the unpatched kernel that "
                 "QEMU >= 10.2 with edk2 >= 202502 measures; use those")
        events1 = []
    else:
        rtmr1 = replay([e.digest for e in events1])
        assumptions.append("QEMU >= 10.2 and edk2 >= 202502: the firmware measures the kernel file "
                           "unpatched (fw_cfg etc/boot/kernel)" + (
                               "" if qemu_version else "; the host's QEMU version is not known here"))
    if firmware is not None and secure_boot_keys_enrolled(firmware):
        assumptions.append("this firmware has secure-boot keys enrolled: it starts the kernel, "
                           "and these values hold, only if its db trusts the kernel's signature")
    elif firmware is None:
        assumptions.append("the firmware could not be read here: whether it enforces secure boot "
                           "(and refuses this kernel) is unknown")

    version = kernel_version(kernel)
    shown = ".".join(map(str, version)) if version else "of unknown version"
    rtmr2 = None
    if version is None or version < STUB_CC_SINCE:
        rtmr2 = (f"not predicted: the kernel (Linux {shown}) predates 6.9, whose EFI stub first "
                 "measures its command line and initrd into a TD's RTMR2; use a kernel >= 6.9")
    elif b"LOADED_IMAGE::LoadOptions" not in kernel or b"Linux initrd" not in kernel:
        rtmr2 = ("not predicted: this kernel's EFI stub does not measure its command line and "
                 "initrd (CONFIG_EFI_STUB without the tagged events); use a kernel that does")
    initrd_digest = placement = None
    if initrd_path is not None and rtmr2 is None:
        try:
            initrd_digest = file_sha384(initrd_path)
        except OSError as error:
            rtmr2 = (f"not predicted: cannot read the initrd {initrd_path} here ({error.strerror}): "
                     "check the path")
        placement = initrd_option_placement(firmware) if firmware is not None else None
        if rtmr2 is None and placement is None:
            rtmr2 = ("not predicted: cannot tell from the firmware image where it adds "
                     "initrd=initrd to the kernel's command line; give --firmware FILE with "
                     "a readable copy of an edk2 OVMF build")
    events2 = []
    if rtmr2 is None:
        skips = initrd_path is not None and stub_skips_initrd(cmdline)
        events2 = rtmr2_events(load_options(cmdline, initrd_path is not None, placement),
                               None if skips else initrd_digest)
        rtmr2 = replay([e.digest for e in events2])
        assumptions.append(f"the kernel's EFI stub (Linux {shown}) measures its command line, then "
                           + ("loads no initrd (noinitrd on its command line), so it measures none"
                              if skips else
                              "the initrd it loads through LINUX_EFI_INITRD_MEDIA_GUID"))
    return BootPrediction(rtmr1, rtmr2, ([] if option_roms else events1) + events2, assumptions)
