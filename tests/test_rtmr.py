"""RTMR1/RTMR2 prediction for direct kernel boot, checked against a real firmware's own log.

The strongest check available without TDX hardware: Debian's OVMF (the same edk2 2026.08
build as its TDX firmware) boots Debian's 6.12 kernel directly under QEMU TCG with a
software TPM (swtpm) whose SHA-384 bank is active. That firmware measures through the
same code as TDVF (DxeTpm2MeasureBootLib, X86QemuLoadImageLib, QemuKernelLoaderFsDxe),
and the kernel's EFI stub through the same efi_measure_tagged_event, into PCRs instead
of RTMRs. The guest prints its TCG event log and PCRs; the test then requires:
- the kernel digest the firmware logged (PCR 4) to be tdxvirt's Authenticode hash;
- PCR 2-6's events, in order, to be tdxvirt's RTMR1 events, once the separators that
  Tcg2Dxe measures into each of PCR 0-7 are counted once (TdTcg2Dxe's OnReadyToBoot
  measures one, into RTMR1 only);
- the TPM's own PCR 9 (started at zero, extended by the stub's two events exactly as a
  TD's RTMR2 is) to equal tdxvirt's predicted RTMR2;
- a NIC's option ROM to be measured into PCR 2 before the kernel (why tdxvirt does not
  predict RTMR1 while a device offers one).
The Authenticode hash has a second implementation below, written from Microsoft's
description as "everything but three ranges" rather than edk2's section walk.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
from conftest import one_line_error
from lxml import etree

from tdxvirt.domain import bootmeasure
from tdxvirt.domain.measure import predict
from tdxvirt.domain.record import local_store
from tdxvirt.domain.recorded import record_from
from tdxvirt.errors import InputError
from tdxvirt.paths import state_dir

CMDLINE = "console=ttyS0 quiet clearcpuid=mtrr"
INIT = """#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t securityfs securityfs /sys/kernel/security
echo BEGIN-LOG
base64 /sys/kernel/security/tpm0/binary_bios_measurements
echo END-LOG
for i in 2 3 4 5 6 9; do echo "PCR $i $(cat /sys/class/tpm/tpm0/pcr-sha384/$i)"; done
poweroff -f
"""
# TCG PC Client PFP spec event types; TCG algorithm ids and their digest sizes
EV_SEPARATOR, EV_EVENT_TAG = 0x4, 0x6
EV_EFI_BOOT_SERVICES_APPLICATION, EV_EFI_BOOT_SERVICES_DRIVER = 0x80000003, 0x80000004
EV_EFI_ACTION = 0x80000007
ALGORITHMS = {0x4: 20, 0xB: 32, 0xC: 48, 0xD: 64}
SHA384 = 0xC
TYPE_NAMES = {EV_SEPARATOR: "EV_SEPARATOR", EV_EVENT_TAG: "EV_EVENT_TAG",
              EV_EFI_BOOT_SERVICES_APPLICATION: "EV_EFI_BOOT_SERVICES_APPLICATION",
              EV_EFI_ACTION: "EV_EFI_ACTION"}


def reference_authenticode(image: bytes) -> str:
    """SHA-384 of the file without its checksum, its certificate table entry and the
    certificates the entry points at (a file offset, for this directory only)."""
    pe = int.from_bytes(image[0x3C:0x40], "little")
    optional = pe + 24
    plus = image[optional:optional + 2] == b"\x0b\x02"
    certificate_entry = optional + (112 if plus else 96) + 32
    certificates = struct.unpack_from("<II", image, certificate_entry)
    skipped = sorted([(optional + 64, 4), (certificate_entry, 8), certificates])
    kept, position = bytearray(), 0
    for start, length in skipped:
        if length:
            kept += image[position:start]
            position = start + length
    return hashlib.sha384(bytes(kept + image[position:])).hexdigest()


def parse_event_log(log: bytes) -> list[tuple[int, int, bytes, bytes]]:
    """(pcr, type, SHA-384 digest, data) of each crypto-agile event (TCG PC Client PFP spec
    10.2: a SHA-1-format Spec ID event, then TCG_PCR_EVENT2 records)."""
    size = struct.unpack_from("<I", log, 28)[0]
    at, events = 32 + size, []
    while at < len(log):
        pcr, kind, count = struct.unpack_from("<III", log, at)
        at += 12
        digests = {}
        for _ in range(count):
            algorithm = struct.unpack_from("<H", log, at)[0]
            digests[algorithm] = log[at + 2:at + 2 + ALGORITHMS[algorithm]]
            at += 2 + ALGORITHMS[algorithm]
        size = struct.unpack_from("<I", log, at)[0]
        events.append((pcr, kind, digests[SHA384], log[at + 4:at + 4 + size]))
        at += 4 + size
    return events


def extend(digests) -> str:
    value = bytes(48)
    for digest in digests:
        value = hashlib.sha384(value + digest).digest()
    return value.hex()


@pytest.fixture(scope="module")
def guest_files(sim) -> tuple[Path, Path]:
    """Debian's kernel (the ACPI guest's) and an initramfs whose init prints the TPM log."""
    from acpi_guest import build_acpi_guest
    from test_guest_live_agent import _download, _newc

    kernel, _ = build_acpi_guest(state_dir() / "fixtures" / "acpi-guest")
    directory = state_dir() / "fixtures" / "rtmr-guest"
    initrd = directory / "initrd-tpmlog.cpio"
    if not initrd.exists():
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as scratch:
            [deb] = _download(("busybox-static",), Path(scratch))
            subprocess.run(["dpkg-deb", "-x", str(deb), f"{scratch}/root"], check=True)
            busybox = Path(scratch, "root/bin/busybox").read_bytes()
        entries = [(d, stat.S_IFDIR | 0o755, b"") for d in ("bin", "dev", "proc", "sys")]
        entries += [("init", stat.S_IFREG | 0o755, INIT.encode()),
                    ("bin/busybox", stat.S_IFREG | 0o755, busybox)]
        entries += [(f"bin/{applet}", stat.S_IFLNK | 0o777, b"busybox")
                    for applet in ("sh", "mount", "base64", "cat", "echo", "poweroff")]
        initrd.write_bytes(_newc(entries))
    return kernel, initrd


def boot_with_tpm(sim, kernel: Path, initrd: Path, nic: bool = False) -> tuple[list, dict[int, str]]:
    """Boot Debian's OVMF with a swtpm under the simulated host's QEMU (TCG): the event
    log and the SHA-384 PCRs the guest printed."""
    assert shutil.which("swtpm") and shutil.which("swtpm_setup"), \
        "swtpm and swtpm_setup are needed (Debian: swtpm swtpm-tools; scripts/setup installs them)"
    inside = Path("/tmp") / f"tdxvirt-rtmr-{uuid.uuid4().hex[:8]}"
    work = sim.chroot / inside.relative_to("/")
    (work / "tpm").mkdir(parents=True)
    swtpm = None
    try:
        shutil.copyfile(kernel, work / "vmlinuz")
        shutil.copyfile(initrd, work / "initrd")
        subprocess.run(["swtpm_setup", "--tpm2", "--tpmstate", str(work / "tpm"),
                        "--pcr-banks", "sha256,sha384", "--overwrite"], check=True, capture_output=True)
        swtpm = subprocess.Popen(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={work / 'tpm'}",
                                  "--ctrl", f"type=unixio,path={work / 'swtpm.sock'}"])
        for _ in range(100):
            if (work / "swtpm.sock").exists():
                break
            subprocess.run(["sleep", "0.05"], check=True)
        qemu = ["chroot", str(sim.chroot), "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg",
                "-m", "1024", "-smp", "1", "-bios", "/usr/share/ovmf/OVMF.fd", "-display", "none",
                "-monitor", "none", "-no-reboot", "-serial", f"file:{inside / 'serial.log'}",
                "-nic", "user,model=virtio-net-pci" if nic else "none",
                "-chardev", f"socket,id=tpm,path={inside / 'swtpm.sock'}",
                "-tpmdev", "emulator,id=tpm0,chardev=tpm", "-device", "tpm-crb,tpmdev=tpm0",
                "-kernel", str(inside / "vmlinuz"), "-initrd", str(inside / "initrd"),
                "-append", CMDLINE]
        subprocess.run(qemu, check=True, capture_output=True, timeout=300)
        output = (work / "serial.log").read_text(errors="replace")
    finally:
        if swtpm is not None and swtpm.poll() is None:
            swtpm.terminate()
            swtpm.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    assert "END-LOG" in output, output[-2000:]
    encoded = output.split("BEGIN-LOG", 1)[1].split("END-LOG", 1)[0]
    log = base64.b64decode("".join(line.strip() for line in encoded.splitlines()
                                   if re.fullmatch(r"[A-Za-z0-9+/=]+", line.strip())))
    pcrs = {int(m[1]): m[2].lower() for m in re.finditer(r"^PCR (\d+) ([0-9A-Fa-f]{96})", output, re.M)}
    return parse_event_log(log), pcrs


@pytest.fixture(scope="module")
def booted(sim, guest_files):
    return boot_with_tpm(sim, *guest_files)


def direct_boot_xml(kernel: str, initrd: str | None, cmdline: str | None = CMDLINE,
                    devices: str = "", loader: str = "/usr/share/ovmf/OVMF.fd") -> str:
    initrd_element = f"<initrd>{initrd}</initrd>" if initrd else ""
    cmdline_element = f"<cmdline>{cmdline}</cmdline>" if cmdline is not None else ""
    return (f"<domain><name>rtmr</name><os><loader type='rom'>{loader}</loader>"
            f"<kernel>{kernel}</kernel>{initrd_element}{cmdline_element}</os>"
            f"<devices>{devices}</devices></domain>")


def predicted(sim, guest_files, **xml):
    kernel, initrd = guest_files
    return predict(direct_boot_xml(str(kernel), str(initrd), **xml),
                   lambda path: str(path) if path in (str(kernel), str(initrd))
                   else str(sim.chroot / path.lstrip("/")))


def test_kernel_digest_is_what_the_firmware_measured(booted, guest_files):
    events, _ = booted
    kernel = guest_files[0].read_bytes()
    [logged] = [d for pcr, kind, d, _ in events if kind == EV_EFI_BOOT_SERVICES_APPLICATION]
    assert bootmeasure.authenticode_sha384(kernel) == logged.hex() == reference_authenticode(kernel)
    certificates = struct.unpack_from("<I", kernel, int.from_bytes(kernel[0x3C:0x40], "little") + 24 + 148)
    assert certificates[0] > 0  # Debian's kernel is signed: the certificates were left out


def test_rtmr1_is_the_replay_of_the_firmwares_events(sim, booted, guest_files):
    events, pcrs = booted
    rtmr1_range = [(pcr, kind, digest, data) for pcr, kind, digest, data in events if 2 <= pcr <= 6]
    # Tcg2Dxe measures a separator into each PCR; TdTcg2Dxe one into RTMR1 (OnReadyToBoot)
    separators = [e for e in rtmr1_range if e[1] == EV_SEPARATOR]
    assert [pcr for pcr, *_ in separators] == [2, 3, 4, 5, 6]
    once = [e for e in rtmr1_range if e[1] != EV_SEPARATOR or e is separators[0]]
    result = predicted(sim, guest_files)
    mine = [e for e in result.rtmr_events if e["register"] == "RTMR1"]
    assert [(TYPE_NAMES[kind], digest.hex()) for _, kind, digest, _ in once] == \
        [(e["type"], e["digest"]) for e in mine]
    assert [data for _, kind, _, data in once if kind == EV_EFI_ACTION] == [
        bootmeasure.CALLING.encode(), bootmeasure.EBS_INVOCATION.encode(), bootmeasure.EBS_SUCCESS.encode()]
    assert result.rtmr1 == extend(digest for _, _, digest, _ in once)
    # the log is the TPM's: replaying PCR 4 and 5 gives the TPM's own registers
    for pcr in (4, 5):
        assert extend(d for p, _, d, _ in events if p == pcr) == pcrs[pcr]


def test_rtmr2_equals_the_tpms_pcr9(sim, booted, guest_files):
    events, pcrs = booted
    logged = [(kind, digest.hex(), data) for pcr, kind, digest, data in events if pcr == 9]
    assert [kind for kind, *_ in logged] == [EV_EVENT_TAG, EV_EVENT_TAG]
    assert b"LOADED_IMAGE::LoadOptions" in logged[0][2] and b"Linux initrd" in logged[1][2]
    result = predicted(sim, guest_files)
    assert result.rtmr2 == pcrs[9]  # the real register, extended only by the stub's events
    assert [e["digest"] for e in result.rtmr_events if e["register"] == "RTMR2"] == \
        [digest for _, digest, _ in logged]
    # independently: the firmware's LoadOptions (edk2 >= 202508) and the initrd's bytes
    options = ("initrd=initrd " + CMDLINE + "\0").encode("utf-16-le")
    assert logged[0][1] == hashlib.sha384(options).hexdigest()
    assert logged[1][1] == hashlib.sha384(guest_files[1].read_bytes()).hexdigest()


def test_an_option_rom_is_measured_into_rtmr1_so_it_is_not_predicted(sim, guest_files):
    events, _ = boot_with_tpm(sim, *guest_files, nic=True)
    kinds = [kind for pcr, kind, _, _ in events if 2 <= pcr <= 6]
    assert kinds.index(EV_EFI_BOOT_SERVICES_DRIVER) < kinds.index(EV_EFI_BOOT_SERVICES_APPLICATION)
    nic = "<interface type='user'><model type='virtio'/></interface>"
    result = predicted(sim, guest_files, devices=nic)
    assert result.rtmr1.startswith("not predictable while the firmware runs option ROMs")
    assert "<interface> virtio" in result.rtmr1 and "<rom enabled='no'/>" in result.rtmr1
    assert len(result.rtmr2) == 96  # RTMR2 does not depend on it
    hidden = "<interface type='user'><model type='virtio'/><rom enabled='no'/></interface>"
    assert predicted(sim, guest_files, devices=hidden).rtmr1 == predicted(sim, guest_files).rtmr1
    gpu = ("<hostdev mode='subsystem' type='pci'><source><address domain='0x0000' bus='0x38' "
           "slot='0x00' function='0x0'/></source></hostdev>")
    assert "<hostdev> 0000:38:00.0" in predicted(sim, guest_files, devices=gpu).rtmr1


def test_debians_tdx_firmware_prefixes_initrd_and_enforces_secure_boot(sim):
    tdx = (sim.chroot / "usr/share/ovmf/OVMF.inteltdx.ms.fd").read_bytes()
    generic = (sim.chroot / "usr/share/ovmf/OVMF.fd").read_bytes()
    assert bootmeasure.initrd_option_placement(tdx) == "prefix"
    assert bootmeasure.initrd_option_placement(generic) == "prefix"
    assert bootmeasure.secure_boot_keys_enrolled(tdx) and not bootmeasure.secure_boot_keys_enrolled(generic)


def test_the_tdx_firmware_adds_a_secure_boot_condition(sim, guest_files):
    result = predicted(sim, guest_files, loader="/usr/share/ovmf/OVMF.inteltdx.ms.fd")
    assert any("secure-boot keys enrolled" in a for a in result.rtmr_assumptions)
    assert result.rtmr2 == predicted(sim, guest_files).rtmr2  # same build, same LoadOptions


def test_load_options_follow_the_firmware_build():
    # before edk2-stable202508 the firmware appended " initrd=initrd"
    assert bootmeasure.load_options("a b", True, "suffix") == "a b initrd=initrd\0".encode("utf-16-le")
    assert bootmeasure.load_options("a b", True, "prefix") == "initrd=initrd a b\0".encode("utf-16-le")
    assert bootmeasure.load_options("a", False, None) == "a\0".encode("utf-16-le")
    assert bootmeasure.load_options("", False, None) == b""  # LoadOptions NULL: nothing measured
    # QEMU passes bytes; the firmware widens each one (UnicodeSPrintAsciiFormat)
    assert bootmeasure.load_options("é", False, None) == b"\xc3\x00\xa9\x00\x00\x00"


def test_without_initrd_rtmr2_is_the_command_line_alone(sim, guest_files):
    kernel = str(guest_files[0])
    result = predict(direct_boot_xml(kernel, None), lambda p: p if p == kernel else str(sim.chroot / p[1:]))
    digest = hashlib.sha384((CMDLINE + "\0").encode("utf-16-le")).hexdigest()
    assert result.rtmr2 == extend([bytes.fromhex(digest)])


def test_what_cannot_be_predicted_says_why(sim, guest_files, tmp_path):
    kernel, initrd = (str(p) for p in guest_files)
    remote = predict(direct_boot_xml(kernel, initrd), lambda path: None)
    assert remote.mrtd is None and "--kernel FILE" in remote.rtmr1 and remote.rtmr_events == []
    local = lambda path: str(sim.chroot / path.lstrip("/"))  # noqa: E731
    disk = predict("<domain><name>d</name><os><loader>/usr/share/ovmf/OVMF.fd</loader></os></domain>", local)
    assert "boots from its disk" in disk.rtmr1 and "boots from its disk" in disk.rtmr2
    shim = direct_boot_xml(kernel, initrd).replace("</os>", "<shim>/x/shimx64.efi</shim></os>")
    assert "through shim" in predict(shim, lambda p: p if p in (kernel, initrd) else local(p)).rtmr1
    not_pe = tmp_path / "vmlinux"
    not_pe.write_bytes(b"\x7fELF" + bytes(4096))
    result = predict(direct_boot_xml(str(not_pe), None), lambda p: p if p == str(not_pe) else local(p))
    assert "not a PE/COFF image" in result.rtmr1 and "not a PE/COFF image" in result.rtmr2
    old = bytearray(guest_files[0].read_bytes())  # the same stub, claiming to be Linux 6.8
    version = struct.unpack_from("<H", old, 0x20E)[0] + 0x200
    old[version:version + 4] = b"6.8."
    (tmp_path / "old").write_bytes(old)
    result = predict(direct_boot_xml(str(tmp_path / "old"), initrd),
                     lambda p: p if p in (str(tmp_path / "old"), initrd) else local(p))
    assert len(result.rtmr1) == 96 and "predates 6.9" in result.rtmr2


def test_damaged_kernels_give_a_digest_or_a_sentence_never_a_crash(guest_files):
    image = guest_files[0].read_bytes()
    for cut in (2, 0x3C, 0x40, 0x80, 0x100, 0x200, 0x1000, 0x10000):
        try:
            assert len(bootmeasure.authenticode_sha384(image[:cut])) == 96
        except InputError as error:
            assert "PE/COFF" in str(error)


def test_measure_cli_prints_the_prediction(conn, td_name, sim, guest_files, gpu_host, run):
    import json

    host = gpu_host[0].base
    for source, target in ((guest_files[0], "boot/vmlinuz"), (guest_files[1], "boot/initrd"),
                           (sim.chroot / "usr/share/ovmf/OVMF.fd", "usr/share/ovmf/OVMF.fd")):
        (host / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, host / target)

    def define(xml: str):
        return conn.defineXML(xml.replace("<domain>", "<domain type='test'>")
                              .replace("<name>rtmr</name>", f"<name>{td_name}</name>")
                              .replace("<os>", "<memory>524288</memory><os><type arch='x86_64'>hvm</type>"))

    domain = define(direct_boot_xml("/boot/vmlinuz", "/etc/shadow"))
    # no root-owned record: no file its XML names is read (no hash of /etc/shadow for
    # whoever may edit domains), only files given on the command line
    report = json.loads(run("measure", td_name, "--json").output)
    assert report["mrtd"] is None and "no root-owned record" in report["unknown"]
    assert "was not read" in report["rtmr2"] and report["rtmr_events"] == []
    conn.lookupByName(td_name).undefine()
    domain = define(direct_boot_xml("/boot/vmlinuz", "/boot/initrd"))
    store = local_store()
    store.write(record_from(domain.XMLDesc(0), domain.UUIDString()))  # as root's define writes it
    report = json.loads(run("measure", td_name, "--json").output)
    assert report["reference"] == "root's record of this TD" and report["reference_differences"] == []
    # the same predictions as Trustee's RVPS takes them (its default TDX policy's names)
    exported = run("measure", td_name, "--reference-values", "trustee")
    message = json.loads(exported.stdout)
    assert message["version"] == "0.1.0" and message["type"] == "sample"
    values = json.loads(base64.b64decode(message["payload"]))
    assert values["mr_td"] == [report["mrtd"]]
    assert values["rtmr_1"] == [report["rtmr1"]] and values["rtmr_2"] == [report["rtmr2"]]
    assert values["tdvfkernel"] == [report["rtmr_events"][0]["digest"]]
    assert values["tdvfkernelparams"] == [next(e["digest"] for e in report["rtmr_events"]
                                              if e["what"].startswith("LOADED_IMAGE::LoadOptions"))]
    assert "tdxvirt: left out xfam" in exported.stderr
    assert len(report["rtmr1"]) == 96 and len(report["rtmr2"]) == 96
    assert report["rtmr2"] == predicted(sim, guest_files).rtmr2
    assert [e["register"] for e in report["rtmr_events"]] == ["RTMR1"] * 5 + ["RTMR2"] * 2
    text = run("measure", td_name).output
    assert f"RTMR1:     {report['rtmr1']}" in text and "assumes: " in text
    # a libvirt user points <initrd> elsewhere: the record's initrd is still what is read
    root = etree.fromstring(domain.XMLDesc(0).encode())
    root.find("os/initrd").text = "/etc/shadow"
    conn.defineXML(etree.tostring(root).decode())
    changed = json.loads(run("measure", td_name, "--json").output)
    assert changed["rtmr2"] == report["rtmr2"]
    assert changed["reference_differences"] == [
        "<initrd> is /etc/shadow, root's record says /boot/initrd"]
    store.remove(domain.UUIDString())
    conn.lookupByName(td_name).undefine()
    define("<domain><name>rtmr</name><os><loader>/usr/share/ovmf/OVMF.fd</loader></os></domain>")
    error = one_line_error(run("measure", td_name, "--kernel", str(host / "boot/vmlinuz")), 2)
    assert "--kernel FILE stands for the TD's <kernel>" in error


def test_define_records_the_predicted_registers_and_measure_sees_a_change(td_name, sim, guest_files,
                                                                          gpu_host, run):
    """define predicts RTMR2 (the kernel's command line and initrd) and records it; RTMR1
    is not recorded while the GPU's option ROM runs in the firmware. A new initrd since
    then is named by measure."""
    import json

    host, gpu = gpu_host
    kernel, initrd = guest_files
    firmware = sim.chroot / "usr/share/ovmf/OVMF.fd"
    for path in (kernel, initrd, firmware):  # define checks the files; facts read the host root
        (host.base / str(path).lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, host.base / str(path).lstrip("/"))
    defined = run("define", td_name, "--gpu", gpu, "--ovmf", str(firmware), "--kernel", str(kernel),
                  "--initrd", str(initrd), "--cmdline", "console=ttyS0")
    assert defined.exit_code == 0, defined.output
    shown = json.loads(run("show", td_name, "--json").output)
    measured = json.loads(run("measure", td_name, "--json").output)
    assert shown["rtmr1"] is None and "option ROM" in measured["rtmr1"]
    assert shown["rtmr2"] == measured["rtmr2"] == measured["recorded_rtmr2"]
    assert len(shown["rtmr2"]) == 96
    assert "the value define recorded" in run("measure", td_name).output

    (host.base / str(initrd).lstrip("/")).write_bytes(initrd.read_bytes() + b"\0" * 512)
    text = run("measure", td_name).output
    assert f"DIFFERS from the value define recorded ({shown['rtmr2']})" in text


# --- an arbitrary --firmware file: a sentence or a one-line error, never a crash --------------------

def _lzma_section(data_offset: bytes, payload: bytes = b"", size: int | None = None) -> bytes:
    """An EFI_GUID_DEFINED_SECTION header (Size, Type 0x02, the LZMA GUID, DataOffset, ...)."""
    body = bootmeasure.LZMA_SECTION + data_offset
    size = 4 + len(body) + len(payload) if size is None else size
    return size.to_bytes(3, "little") + b"\x02" + body + payload


@pytest.mark.parametrize("image", [
    bytes(64) + _lzma_section(b""),  # the image ends right after the GUID: no DataOffset
    bytes(64) + _lzma_section(b"\x18"),  # half a DataOffset
    bootmeasure.LZMA_SECTION + bytes(8),  # the GUID at offset 0: no room for a header before it
    bytes(64) + _lzma_section(b"\xff\xff\x01\x00", b"\x5d" + bytes(40)),  # DataOffset past the section
    bytes(64) + _lzma_section(b"\x18\x00\x01\x00", b"\x5d\x00\x00\x80\x00" + b"\xff" * 8 + bytes(30)),  # not LZMA
    bytes(64) + _lzma_section(b"\x18\x00\x01\x00", size=0xFFFFF0),  # a size past the image
])
def test_damaged_firmware_sections_are_skipped_not_a_crash(image):
    assert bootmeasure.initrd_option_placement(image) is None
    assert bootmeasure.secure_boot_keys_enrolled(image) is False


def test_an_lzma_bomb_is_cut_at_the_volume_limit():
    import lzma

    packed = lzma.compress(bytes(bootmeasure.VOLUME_LIMIT + 4096), format=lzma.FORMAT_ALONE)
    image = bytes(16) + _lzma_section(b"\x18\x00\x01\x00", packed)
    [volume] = bootmeasure._decompressed_volumes(image)
    assert len(volume) == bootmeasure.VOLUME_LIMIT


def test_any_cut_or_changed_byte_of_a_real_firmware_gives_an_answer(sim):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    firmware = (sim.chroot / "usr/share/ovmf/OVMF.inteltdx.ms.fd").read_bytes()
    sections, at = [], firmware.find(bootmeasure.LZMA_SECTION)
    while at != -1:
        sections.append(at)
        at = firmware.find(bootmeasure.LZMA_SECTION, at + 1)
    assert sections  # the real image has the compressed DXE volume this reads
    around = st.sampled_from(sections).flatmap(lambda at: st.integers(min_value=max(0, at - 8), max_value=at + 40))

    @settings(max_examples=60, deadline=None)
    @given(cut=around, change=around, value=st.integers(min_value=0, max_value=255))
    def check(cut, change, value):
        image = bytearray(firmware)
        image[change] = value
        image = bytes(image[:cut])
        assert bootmeasure.initrd_option_placement(image) in ("prefix", "suffix", None)
        assert bootmeasure.secure_boot_keys_enrolled(image) in (True, False)

    check()


def test_a_damaged_firmware_file_gives_a_sentence_or_one_line(sim, guest_files, tmp_path):
    firmware = (sim.chroot / "usr/share/ovmf/OVMF.fd").read_bytes()
    at = firmware.find(bootmeasure.LZMA_SECTION)
    kernel, initrd = (str(p) for p in guest_files)
    xml = direct_boot_xml(kernel, initrd)
    for name, image in (("cut-in-header.fd", firmware[:at + 17]), ("cut-in-volume.fd", firmware[:at + 4096]),
                        ("empty.fd", b"")):
        damaged = tmp_path / name
        damaged.write_bytes(image)
        try:
            result = predict(xml, lambda p: p if p in (kernel, initrd) else None, firmware_override=str(damaged))
        except InputError as error:
            assert "\n" not in str(error)
        else:
            assert "cannot tell from the firmware image where it adds initrd=initrd" in result.rtmr2
            assert len(result.rtmr1) == 96


@pytest.mark.parametrize("cmdline, skips", [
    ("console=ttyS0 noinitrd", True), ('noinitrd quiet="a b"', True),
    ("console=ttyS0 -- noinitrd", False),  # after "--": the init's, not the stub's
    ("noinitrd=1", False), ("xnoinitrd", False), ("console=ttyS0", False)])
def test_noinitrd_before_the_dashes_means_no_initrd_event(sim, guest_files, cmdline, skips):
    """The EFI stub parses its options (efi_parse_options, stopping at "--") and loads no
    initrd under noinitrd: RTMR2 is then the command line alone, LoadOptions still
    carrying the firmware's initrd=initrd."""
    assert bootmeasure.stub_skips_initrd(cmdline) is skips
    result = predicted(sim, guest_files, cmdline=cmdline)
    events = [e["what"].split(" (")[0] for e in result.rtmr_events if e["register"] == "RTMR2"]
    options = ("initrd=initrd " + cmdline + "\0").encode("utf-16-le")
    first = hashlib.sha384(options).digest()
    if skips:
        assert events == ["LOADED_IMAGE::LoadOptions"] and result.rtmr2 == extend([first])
        assert any("loads no initrd (noinitrd" in a for a in result.rtmr_assumptions)
    else:
        assert events == ["LOADED_IMAGE::LoadOptions", "Linux initrd"]


def test_a_kernel_the_secure_boot_firmware_would_refuse_is_not_defined(td_name, sim, guest_files,
                                                                       gpu_host, run, conn, tmp_path):
    """Debian's OVMF.inteltdx.ms.fd enforces Secure Boot with Microsoft's keys: an
    unsigned kernel would never start on it (refused at define, naming the way out);
    Debian's signed kernel gets a warning (its signer is shim's, not in that db)."""
    import struct

    host, gpu = gpu_host
    kernel, _ = guest_files
    firmware = sim.chroot / "usr/share/ovmf/OVMF.inteltdx.ms.fd"
    image = bytearray(kernel.read_bytes())
    pe = struct.unpack_from("<I", image, 0x3C)[0]
    entry = pe + 24 + 112 + 4 * 8  # PE32+: the certificate table's data directory
    struct.pack_into("<II", image, entry, 0, 0)
    unsigned = tmp_path / "vmlinuz-unsigned"
    unsigned.write_bytes(bytes(image))
    for path in (unsigned, kernel, firmware):  # define checks the files; facts read the host root
        (host.base / str(path).lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, host.base / str(path).lstrip("/"))
    assert bootmeasure.authenticode_signed(bytes(image)) is False
    refused = run("define", td_name, "--gpu", gpu, "--ovmf", str(firmware), "--kernel",
                  str(unsigned), "--cmdline", "console=ttyS0")
    line = one_line_error(refused, 2)
    assert f"enforces Secure Boot with enrolled keys and the kernel {unsigned} is not signed" in line
    assert "--ovmf with a TDX firmware without enrolled keys" in line
    assert td_name not in [d.name() for d in conn.listAllDomains(0)]
    signed = run("define", td_name, "--gpu", gpu, "--ovmf", str(firmware), "--kernel",
                 str(kernel), "--cmdline", "console=ttyS0")
    assert signed.exit_code == 0, signed.output
    assert "starts only if its signer is in that firmware's db" in signed.output


def test_qemu_before_10_2_patches_the_kernel_so_rtmr1_is_not_predicted(sim, guest_files, qemu_conn):
    """QEMU < 10.2 hands the firmware a kernel with its setup header patched; RTMR1 is
    then not predicted, by name. RTMR2 (command line, initrd) does not depend on it."""
    from tdxvirt.virt.conn import qemu_version

    kernel, initrd = (str(p) for p in guest_files)
    local = lambda p: p if p in (kernel, initrd) else str(sim.chroot / p.lstrip("/"))  # noqa: E731
    xml = direct_boot_xml(kernel, initrd)
    old = predict(xml, local, qemu_version=(9, 2, 0))
    assert old.rtmr1.startswith("not predicted: QEMU 9.2.0 (< 10.2) patches the kernel's setup header")
    assert [e["register"] for e in old.rtmr_events] == ["RTMR2", "RTMR2"]
    new = predict(xml, local, qemu_version=(10, 2, 0))
    assert len(new.rtmr1) == 96 and new.rtmr2 == old.rtmr2
    assert any("QEMU >= 10.2 and edk2 >= 202502" in a for a in new.rtmr_assumptions)
    assert qemu_version(qemu_conn) >= (11, 0, 0)  # the emulated host's QEMU: predicted


def test_a_fifo_or_a_device_as_kernel_or_initrd_is_a_sentence_at_once(sim, guest_files, tmp_path):
    import os
    import time

    kernel, initrd = (str(p) for p in guest_files)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    local = lambda p: p if p in (kernel, initrd, str(fifo), "/dev/zero") \
        else str(sim.chroot / p.lstrip("/"))  # noqa: E731
    started = time.monotonic()
    for bad_kernel, bad_initrd in ((str(fifo), initrd), ("/dev/zero", initrd), (kernel, str(fifo)),
                                   (kernel, "/dev/zero")):
        result = predict(direct_boot_xml(bad_kernel, bad_initrd), local)
        assert result.rtmr2.startswith("not predicted") and "not a regular file" in result.rtmr2
    assert time.monotonic() - started < 10
