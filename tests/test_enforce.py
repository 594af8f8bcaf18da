"""A TD stays a TD whichever tool starts it: root's record, libvirt's hook, adopt.

Golden TDs with their records (tdxvirt.domain.recorded) for the rules; the hook file
itself run as libvirt runs it; and on the emulated TDX host, libvirt's real qemu
driver calling the hook that `sim up` installed, with the tools users run (virsh,
virt-xml, virt-clone) doing the weakening and the starting.
"""

from __future__ import annotations

import copy
import os
import subprocess
import threading
import time
import uuid
from dataclasses import replace

import libvirt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree
from test_integrity import WEAKENINGS, edited_with_virsh, golden, run, virt_xml, weaken

from tdxvirt.domain.domainxml import NAMESPACE, DomainXML
from tdxvirt.domain.integrity import problems
from tdxvirt.domain.record import RecordError, RecordStore
from tdxvirt.domain.recorded import record_from
from tdxvirt.domain.recordfiles import check as check_files
from tdxvirt.enforce.hook import decide
from tdxvirt.enforce.script import script
from tdxvirt.filedigest import DigestError
from tdxvirt.lifecycle.repair import plan_repair

QEMU = "http://libvirt.org/schemas/domain/qemu/1.0"


def _recorded(name, tmp_path):
    """A golden TD named "one", with a UUID, and root's record of it as define writes it."""
    plan, xml = golden(name, tmp_path)
    root = etree.fromstring(xml.encode())
    root.find("name").text = "one"
    identity = str(uuid.uuid4())
    etree.SubElement(root, "uuid").text = identity
    return plan, root, record_from(root, identity)


def _arg(root, *values):
    line = root.find(f"{{{QEMU}}}commandline")
    for value in values:
        etree.SubElement(line, f"{{{QEMU}}}arg", value=value)


# Weakenings only root's record (or tdxvirt's rules) can tell from a legitimate TD.
RECORDED_WEAKENINGS = {
    **WEAKENINGS,
    "debug": lambda r: setattr(r.find("launchSecurity/policy"), "text", "0x10000001"),
    "SEPT #VE enabled": lambda r: setattr(r.find("launchSecurity/policy"), "text", "0x0"),
    "-readconfig": lambda r: _arg(r, "-readconfig", "/tmp/machine.cfg"),
    "-set": lambda r: _arg(r, "-set", "machine.confidential-guest-support="),
    "-global": lambda r: _arg(r, "-global", "ICH9-LPC.disable_s3=0"),
    "cpu host-model": lambda r: r.find("cpu").set("mode", "host-model"),
    "loader swapped": lambda r: setattr(r.find("os/loader"), "text", "/tmp/evil-ovmf.fd"),
    "mrConfigId changed": lambda r: _set(r.find("launchSecurity"), "mrConfigId", "A" * 64),
}


def _set(parent, tag: str, text: str) -> None:
    element = parent.find(tag)
    if element is None:
        element = etree.SubElement(parent, tag)
    element.text = text


def _canonical(element) -> bytes:
    parser = etree.XMLParser(remove_blank_text=True)
    return etree.tostring(etree.fromstring(etree.tostring(element), parser))
# Weakenings repair cannot undo by itself (a person decides): refused with the way back.
UNREPAIRABLE = {"GPU removed": lambda r: r.find("devices").remove(r.find("devices/hostdev"))}


@pytest.mark.parametrize("weakening", sorted(RECORDED_WEAKENINGS) + sorted(UNREPAIRABLE))
def test_each_weakening_is_caught_against_the_record(weakening, tmp_path):
    plan, root, record = _recorded("one-gpu", tmp_path)
    assert problems(root, libvirt_version=12_008_000, record=record) == []
    {**RECORDED_WEAKENINGS, **UNREPAIRABLE}[weakening](root)
    found = problems(root, libvirt_version=12_008_000, record=record,
                     window_needed_mib=lambda _: plan.mmio_mb)
    assert found and all(p.what and p.fix for p in found), weakening


def test_debug_and_sept_ve_are_named_and_without_a_record_too(tmp_path):
    _, root, record = _recorded("one-gpu", tmp_path)
    RECORDED_WEAKENINGS["debug"](root)
    for reference in (record, None):
        [found] = problems(root, record=reference)
        assert found.what.startswith("debug is on (TD attribute DEBUG")
    root.find("launchSecurity/policy").text = "0x0"
    [found] = problems(root, record=None)
    assert "SEPT #VE is enabled" in found.what


def test_a_qemu_args_tds_attributes_are_read_from_its_tdx_object(tmp_path):
    """The scenario asks for debug (recorded: fine); SEPT #VE enabled in the object's
    attributes is caught with the record and without, debug without one."""
    _, root, record = _recorded("qemu-args", tmp_path)
    assert problems(root, record=record) == []
    assert any("debug is on" in p.what for p in problems(root, record=None))
    line = root.find(f"{{{QEMU}}}commandline")
    [tdx] = [a for a in line if "tdx-guest" in a.get("value")]
    tdx.set("value", tdx.get("value").replace('"attributes":268435457', '"attributes":1'))
    for reference in (record, None):
        assert any("SEPT #VE is enabled" in p.what for p in problems(root, record=reference)), reference


def test_the_metadata_copy_is_never_a_reference(tmp_path, schema_dir):
    """A libvirt user edits <tdxvirt:protected> in the metadata (debug policy, their
    QEMU argument) and then strips the TD: repair puts back root's record, not theirs."""
    plan, root, record = _recorded("one-gpu", tmp_path)
    protected = root.find(f"metadata/{{{NAMESPACE}}}td/{{{NAMESPACE}}}protected")
    protected.find("launchSecurity/policy").text = "0x10000001"
    etree.SubElement(protected.find(f"{{{QEMU}}}commandline"), f"{{{QEMU}}}arg",
                     value="-chardev").tail = None
    root.remove(root.find("launchSecurity"))
    repair = plan_repair(etree.tostring(root).decode(), libvirt_version=12_008_000,
                         window_needed_mib=lambda _: plan.mmio_mb, record=record)
    fixed = etree.fromstring(repair.after.encode())
    assert fixed.findtext("launchSecurity/policy") == "0x10000000"
    assert "-chardev" not in [a.get("value") for a in fixed.find(f"{{{QEMU}}}commandline")]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["one-gpu", "native-unix-qgs", "two-gpus-numa"]),
       edits=st.lists(st.sampled_from(sorted(RECORDED_WEAKENINGS)), min_size=1, max_size=4,
                      unique=True))
def test_any_weakening_is_repaired_back_to_the_record(name, edits, tmp_path, schema_dir):
    from tdxvirt.virt.schema import validate_domain_xml

    plan, root, record = _recorded(name, tmp_path)
    original = copy.deepcopy(root)
    weaken(root, edits, RECORDED_WEAKENINGS)
    repair = plan_repair(etree.tostring(root).decode(), libvirt_version=12_008_000,
                         window_needed_mib=lambda _: plan.mmio_mb, record=record)
    assert repair.left == [], repair.left
    fixed = etree.fromstring(repair.after.encode())
    assert problems(fixed, libvirt_version=12_008_000, record=record,
                    window_needed_mib=lambda _: plan.mmio_mb) == []
    for path in ("launchSecurity", "os/loader", "cpu"):
        assert _canonical(fixed.find(path)) == _canonical(original.find(path)), path
    validate_domain_xml(repair.after, schema_dir)


def test_a_clone_is_named_and_a_recorded_td_stays_recorded_without_its_marks(tmp_path):
    _, root, record = _recorded("one-gpu", tmp_path)
    mark = root.find(f"metadata/{{{NAMESPACE}}}td")
    etree.SubElement(mark, f"{{{NAMESPACE}}}uuid").text = str(uuid.uuid4())  # the original's
    assert [p.kind for p in problems(root)] == ["clone"]
    # stripped of every mark and of TDX: still a TD, because root recorded it
    root.remove(root.find("metadata"))
    root.remove(root.find("launchSecurity"))
    assert "launch-security" in [p.kind for p in problems(root, record=record)]


# --- the record ---------------------------------------------------------------------

def test_a_record_round_trips_and_hostile_files_are_refused(tmp_path):
    _, _, record = _recorded("native-unix-qgs", tmp_path)
    store = RecordStore(tmp_path / "records")
    path = store.write(record)
    assert store.read(record.uuid) == record
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct(store.directory.stat().st_mode & 0o777) == "0o700"
    assert store.read(str(uuid.uuid4())) is None
    hostile = {
        "symlink": lambda p: p.symlink_to("/etc/shadow"),
        "fifo": lambda p: os.mkfifo(p),
        "another owner": lambda p: (p.write_text(record.to_json()), os.chown(p, 1000, 1000)),
        "writable by others": lambda p: (p.write_text(record.to_json()), p.chmod(0o666)),
        "too large": lambda p: p.write_text(" " * (2 << 20)),
        "damaged": lambda p: p.write_text("{"),
        "another domain's": lambda p: p.write_text(record.to_json()),
    }
    for what, make in hostile.items():
        other = str(uuid.uuid4())
        make(store.path(other))
        started = time.monotonic()
        with pytest.raises(RecordError, match="adopt"):
            store.read(other)
        assert time.monotonic() - started < 1, what
    store.remove(record.uuid)
    assert store.read(record.uuid) is None


def test_an_untrustworthy_record_refuses_the_td(tmp_path):
    _, root, record = _recorded("one-gpu", tmp_path)
    store = RecordStore(tmp_path / "records")
    store.path(record.uuid).parent.mkdir(mode=0o700)
    os.mkfifo(store.path(record.uuid))
    message = decide("one", "prepare", "begin", etree.tostring(root), store)
    assert message.startswith("tdxvirt: 'one' is no longer the TD") and "adopt" in message


# --- the hook's decisions and its file, as libvirt runs it ----------------------------

def test_the_hook_decides_each_operation(tmp_path):
    _, root, record = _recorded("one-gpu", tmp_path)
    store = RecordStore(tmp_path / "records")
    store.write(record)
    xml = etree.tostring(root)
    for operation in ("prepare", "start", "started", "stopped", "release", "reconnect"):
        assert decide("one", operation, "begin", xml, store) is None
    assert "managedsave-remove" in decide("one", "restore", "begin", xml, store)
    assert "does not migrate" in decide("one", "migrate", "begin", xml, store)
    RECORDED_WEAKENINGS["-readconfig"](root)
    refused = decide("one", "prepare", "begin", etree.tostring(root), store)
    assert refused.startswith("tdxvirt: 'one' is no longer the TD it was defined as; "
                              "`tdxvirt repair one` puts it back")
    assert "what changed: <qemu:commandline> passes QEMU arguments tdxvirt did not write " \
           "(-readconfig" in refused and "\n" not in refused
    plain = b"<domain type='kvm'><name>vm</name><uuid>%s</uuid></domain>" % str(uuid.uuid4()).encode()
    assert decide("vm", "prepare", "begin", plain, store) is None
    assert decide("vm", "restore", "begin", plain, store) is None


def test_memory_snapshots_in_libvirts_metadata_refuse_the_start(tmp_path):
    _, root, record = _recorded("one-gpu", tmp_path)
    store = RecordStore(tmp_path / "records")
    store.write(record)
    snapshots = tmp_path / "snapshot" / "one"
    snapshots.mkdir(parents=True)
    (snapshots / "disk.xml").write_text("<domainsnapshot><name>disk</name><state>shutoff</state>"
                                        "<memory snapshot='no'/></domainsnapshot>")
    xml = etree.tostring(root)
    assert decide("one", "prepare", "begin", xml, store, str(tmp_path / "snapshot")) is None
    (snapshots / "s1.xml").write_text("<domainsnapshot><name>s1</name><state>running</state>"
                                      "<memory snapshot='external' file='/x'/></domainsnapshot>")
    refused = decide("one", "prepare", "begin", xml, store, str(tmp_path / "snapshot"))
    assert "snapshot 's1' holds memory" in refused and "`virsh snapshot-delete one s1`" in refused
    (snapshots / "s1.xml").unlink()
    os.mkfifo(snapshots / "s2.xml")  # bounded: a FIFO refuses, never hangs
    assert "not a readable regular file" in decide("one", "prepare", "begin", xml, store,
                                                   str(tmp_path / "snapshot"))


def _hook(tmp_path, records, code=None):
    path = tmp_path / "hook"
    path.write_bytes(script(str(records), code=code))
    path.chmod(0o755)
    return path


def _call(hook, xml: bytes, *args):
    return subprocess.run([str(hook), *(args or ("dom", "prepare", "begin", "-"))], input=xml,
                          capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"})


def test_the_installed_hook_fails_closed_for_tds_and_open_for_vms(tmp_path):
    _, root, record = _recorded("one-gpu", tmp_path)
    RecordStore(tmp_path / "records").write(record)
    vm = b"<domain type='kvm'><name>vm</name><uuid>%s</uuid></domain>" % str(uuid.uuid4()).encode()
    good = _hook(tmp_path, tmp_path / "records")
    assert _call(good, etree.tostring(root)).returncode == 0
    assert _call(good, vm).returncode == 0
    # a tdxvirt that cannot be loaded: this Python without its site-packages
    broken = tmp_path / "broken"
    broken.write_bytes(script(str(tmp_path / "records"), interpreter="/usr/bin/python3",
                              code=str(tmp_path / "nowhere")))
    broken.chmod(0o755)
    assert _call(broken, vm).returncode == 0  # an ordinary VM never needs tdxvirt
    for td in (etree.tostring(root), etree.tostring(root).replace(b"tdx", b"xxx")):  # recorded
        refused = _call(broken, td)
        assert refused.returncode == 1
        assert refused.stderr.decode().startswith("tdxvirt: 'dom' was not started: tdxvirt's hook "
                                                  "cannot load tdxvirt")
        assert len(refused.stderr.splitlines()) == 1
    assert _call(broken, vm, "dom", "started", "begin", "-").returncode == 0


# --- the files root's record names: firmware, kernel, initrd --------------------------

def _with_boot_files(tmp_path, direct_boot: bool = False):
    """A golden TD booting files of its own (as the daemon sees them: these paths) and
    its record, written with their digests as define writes it."""
    _, root, _ = _recorded("one-gpu", tmp_path)
    files = tmp_path / "host"
    files.mkdir()
    (files / "OVMF.fd").write_bytes(b"TDVF" * 4096)
    root.find("os/loader").text = str(files / "OVMF.fd")
    if direct_boot:
        for tag, data in (("kernel", b"MZ kernel"), ("initrd", b"070701 initrd")):
            (files / tag).write_bytes(data)
            _set(root.find("os"), tag, str(files / tag))
    record = record_from(root, root.findtext("uuid"), host_path=str)
    store = RecordStore(tmp_path / "records")
    store.write(record)
    return root, record, store, files


def test_the_record_keeps_each_boot_files_digest_and_refuses_a_damaged_one(tmp_path):
    import hashlib
    import json

    root, record, store, files = _with_boot_files(tmp_path, direct_boot=True)
    assert record.digests == {
        "loader": {"sha256": hashlib.sha256(b"TDVF" * 4096).hexdigest(), "size": 16384},
        "kernel": {"sha256": hashlib.sha256(b"MZ kernel").hexdigest(), "size": 9},
        "initrd": {"sha256": hashlib.sha256(b"070701 initrd").hexdigest(), "size": 13}}
    assert store.read(record.uuid) == record
    data = json.loads(record.to_json())
    data["digests"]["loader"]["sha256"] = "not a digest"
    store.path(record.uuid).write_text(json.dumps(data))
    with pytest.raises(RecordError, match="damaged.*digest of 'loader'"):
        store.read(record.uuid)  # never "no digest": a damaged record refuses the TD
    (files / "kernel").unlink()
    unread = []
    partial = record_from(root, record.uuid, host_path=str, unread=unread)  # define: what it can
    assert set(partial.digests) == {"loader", "initrd"}
    assert unread == [f"its kernel {files / 'kernel'} is missing"]
    with pytest.raises(DigestError, match=f"^its kernel {files / 'kernel'} is missing$"):
        record_from(root, record.uuid, host_path=str)  # adopt: nothing unchecked


def _refusal(root, store) -> str | None:
    return decide("one", "prepare", "begin", etree.tostring(root), store)


def test_the_hook_refuses_a_replaced_removed_or_unreadable_boot_file_in_one_line(tmp_path):
    import hashlib

    root, record, store, files = _with_boot_files(tmp_path, direct_boot=True)
    assert _refusal(root, store) is None
    firmware = files / "OVMF.fd"
    firmware.write_bytes(b"EVIL" * 4096)  # same size, other bytes
    refused = _refusal(root, store)
    assert refused == (
        "tdxvirt: 'one' is no longer the TD it was defined as; put the recorded file back, or "
        "check this one and record it with `tdxvirt adopt one` (`tdxvirt build status` tells a "
        "tdxvirt build's changed files); what changed: its firmware "
        f"{firmware} is not the file recorded (sha256 {record.digests['loader']['sha256'][:12]} "
        f"recorded, {hashlib.sha256(b'EVIL' * 4096).hexdigest()[:12]} found): the TD's MRTD "
        "changes with it")
    firmware.write_bytes(b"TDVF" * 4096)  # the recorded file put back
    assert _refusal(root, store) is None
    (files / "initrd").write_bytes(b"070701 initrd, rebuilt")
    assert "its initrd" in _refusal(root, store) and "RTMR1/RTMR2" in _refusal(root, store)
    (files / "initrd").write_bytes(b"070701 initrd")
    (files / "kernel").unlink()
    refused = _refusal(root, store)
    assert refused.startswith("tdxvirt: 'one' is no longer the TD it was defined as; put the recorded "
                              "file back (reinstall its package; `tdxvirt build status`") \
        and "adopt" not in refused
    assert refused.endswith(f"what changed: its kernel {files / 'kernel'} (sha256 "
                            f"{record.digests['kernel']['sha256'][:12]} recorded) is missing")
    os.mkfifo(files / "kernel")  # bounded and nonblocking: refused at once, never waited on
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(line=_refusal(root, store)), daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "the hook blocked on a FIFO put where the kernel was"
    assert outcome["line"].endswith("recorded) is not a regular file (a FIFO)")
    assert "\n" not in outcome["line"]


def test_an_older_record_without_digests_is_not_checked(tmp_path):
    root, record, store, files = _with_boot_files(tmp_path)
    store.write(replace(record, digests={}))  # as an older tdxvirt wrote it
    (files / "OVMF.fd").write_bytes(b"another firmware")
    assert _refusal(root, store) is None
    (states,) = check_files(store.read(record.uuid))
    assert (states.state, states.describe()) == ("unrecorded", "no digest recorded (an older tdxvirt's "
                                                 "record, or the file could not be read at define): "
                                                 "not checked")


def test_the_installed_hook_refuses_a_replaced_firmware(tmp_path):
    root, record, store, files = _with_boot_files(tmp_path)
    hook = _hook(tmp_path, store.directory)
    assert _call(hook, etree.tostring(root)).returncode == 0
    (files / "OVMF.fd").write_bytes(b"another firmware")
    refused = _call(hook, etree.tostring(root))
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1
    assert f"its firmware {files / 'OVMF.fd'} is not the file recorded" in refused.stderr.decode()


def test_show_measure_start_and_adopt_of_a_td_whose_firmware_was_replaced(conn, gpu_host, td_name):
    """On the test driver (no hook there): tdxvirt's own commands, through the fake host root."""
    import json

    from conftest import cli_runner, one_line_error
    from test_tdvf import synthetic_firmware

    host, gpu = gpu_host
    cli = cli_runner(conn.getURI(), host.base)
    assert cli("define", td_name, "--gpu", gpu).exit_code == 0
    loader = conn.lookupByName(td_name).XMLDesc(0).split("<loader", 1)[1].split(">", 2)[1].split("<")[0]
    assert f"Boot files:     firmware {loader}: sha256 e3b0c44298fc, 0 bytes, as recorded" \
        in cli("show", td_name).stdout
    host.path(loader).write_bytes(b"another firmware")
    shown = cli("show", td_name).stdout
    assert f"firmware {loader}: CHANGED since recorded: sha256 e3b0c44298fc recorded (0 bytes)" in shown
    assert f"  - its firmware {loader} is not the file recorded" in shown
    (state,) = json.loads(cli("show", td_name, "--json").stdout)["recorded_files"]
    assert (state["file"], state["state"]) == ("firmware", "changed")
    assert "; and since it was recorded, its firmware" in one_line_error(cli("measure", td_name), 2)
    host.path(loader).write_bytes(synthetic_firmware(bytes(8192)))  # TDX firmware, not the recorded
    measured = cli("measure", td_name)
    assert f"the recorded firmware {loader}: CHANGED since recorded" in measured.stdout, measured.output
    refused = one_line_error(cli("start", td_name), 1)
    assert "is not the file recorded" in refused and f" adopt {td_name}`" in refused, refused
    adopted = cli("adopt", td_name)
    assert adopted.exit_code == 0, adopted.output
    assert f"firmware:        {loader} (sha256 " in adopted.stdout
    assert f", {host.path(loader).stat().st_size} bytes, not the file recorded before)" in adopted.stdout
    assert cli("show", td_name, "--json").stdout.count('"problems": []') == 1
    assert cli("start", td_name).exit_code == 0
    cli("destroy", td_name)


# --- on the emulated TDX host: libvirt's qemu driver calls the hook -------------------

def virsh(sim, *args, timeout=120):
    return subprocess.run(["virsh", "-c", sim.qemu_uri, *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def _refused(done, says: str, way_back: str) -> None:
    assert done.returncode != 0
    assert "Hook script execution failed" in done.stderr, done.stderr
    line = done.stderr.split("unexpected exit status 1: ", 1)[1].strip()
    assert line.startswith("tdxvirt: ") and says in line and way_back in line, line


LIVE_CASES = {
    "launch security deleted (virt-xml)": (
        lambda sim, name, tmp: virt_xml(sim, name, "--edit", "--xml", "xpath.delete=./launchSecurity"),
        "<launchSecurity type='tdx'> was removed", "tdxvirt repair"),
    "debug policy (virt-xml)": (
        lambda sim, name, tmp: virt_xml(sim, name, "--edit", "--xml", "./launchSecurity/policy=0x10000001"),
        "debug is on", "tdxvirt repair"),
    "-readconfig clearing confidential-guest-support (virsh edit)": (
        lambda sim, name, tmp: edited_with_virsh(sim, name, tmp, (
            "q = '{http://libvirt.org/schemas/domain/qemu/1.0}'\n"
            "line = root.find(q + 'commandline')\n"
            "for v in ('-readconfig', '/var/lib/libvirt/qemu/weaken.cfg'):\n"
            "    etree.SubElement(line, q + 'arg', value=v)")),
        "did not write (-readconfig", "tdxvirt repair"),
    "CPU host-model (virt-xml, as virt-manager's CPU page)": (
        lambda sim, name, tmp: virt_xml(sim, name, "--edit", "--cpu", "host-model"),
        "CPU mode is host-model", "tdxvirt repair"),
}


@pytest.mark.parametrize("case", sorted(LIVE_CASES))
def test_virsh_start_of_a_weakened_td_is_refused_inside_libvirt_then_repaired(case, td, sim,
                                                                              qemu_conn, tmp_path,
                                                                              cc_on):
    edit, says, way_back = LIVE_CASES[case]
    edit(sim, td, tmp_path)
    _refused(virsh(sim, "start", td), says, way_back)
    assert not qemu_conn.lookupByName(td).isActive()
    assert run("repair", td).returncode == 0
    started = virsh(sim, "start", td)
    assert started.returncode == 0, started.stderr
    virsh(sim, "destroy", td)


def test_a_removed_gpu_is_refused_until_root_adopts_the_td_as_it_is(td, sim, qemu_conn, cc_on):
    virt_xml(sim, td, "--remove-device", "--hostdev", "1")
    _refused(virsh(sim, "start", td), "is gone", f"tdxvirt adopt {td}")
    repaired = run("repair", td)
    assert repaired.returncode != 0 and "cannot repair" in repaired.stderr
    adopted = run("adopt", td, "--dry-run")
    assert adopted.returncode == 0 and "Would record" in adopted.stdout
    assert virsh(sim, "start", td).returncode != 0  # a dry run recorded nothing
    assert run("adopt", td).returncode == 0
    started = virsh(sim, "start", td)
    assert started.returncode == 0, started.stderr
    virsh(sim, "destroy", td)


def test_save_then_start_and_a_memory_snapshot_are_refused(td, sim, qemu_conn, cc_on):
    assert virsh(sim, "start", td).returncode == 0
    assert virsh(sim, "managedsave", td).returncode == 0
    _refused(virsh(sim, "start", td), "never resumed from saved memory",
             f"virsh managedsave-remove {td}")
    assert not qemu_conn.lookupByName(td).isActive()
    assert virsh(sim, "managedsave-remove", td).returncode == 0
    assert virsh(sim, "start", td).returncode == 0
    made = virsh(sim, "snapshot-create-as", td, "mem1", "--memspec",
                 f"file=/var/lib/libvirt/qemu/save/{td}-mem1.mem,snapshot=external")
    assert made.returncode == 0, made.stderr
    virsh(sim, "destroy", td)
    _refused(virsh(sim, "start", td), "snapshot 'mem1' holds memory", "virsh snapshot-delete")
    assert "snapshot 'mem1' holds memory" in run("show", td).stdout
    # a revert is refused by the same hook (libvirt then reports its own I/O helper's
    # broken pipe over the hook's line: the TD stays off, `tdxvirt show` says why)
    assert virsh(sim, "snapshot-revert", td, "mem1").returncode != 0
    assert not qemu_conn.lookupByName(td).isActive()
    assert virsh(sim, "snapshot-delete", td, "mem1", "--metadata").returncode == 0
    assert virsh(sim, "start", td).returncode == 0
    virsh(sim, "destroy", td)


def test_a_clone_is_refused_until_it_has_its_own_gpu_and_root_adopts_it(td, sim, qemu_conn, cc_on):
    clone = f"{td}-clone"
    made = subprocess.run(["virt-clone", "--connect", sim.qemu_uri, "--original", td, "--name", clone,
                           "--auto-clone"], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    try:
        _refused(virsh(sim, "start", clone), "copy (clone) of the TD", f"tdxvirt adopt {clone}")
        shared = run("adopt", clone)
        assert shared.returncode != 0 and "also passed through by" in shared.stderr
        virt_xml(sim, clone, "--remove-device", "--hostdev", "1")
        assert run("adopt", clone).returncode == 0
        started = virsh(sim, "start", clone)
        assert started.returncode == 0, started.stderr
    finally:
        virsh(sim, "destroy", clone)
        virsh(sim, "undefine", clone)


def test_ordinary_vms_on_the_same_daemon_start_with_the_hook_installed(sim, qemu_conn):
    name = f"vm-{uuid.uuid4().hex[:8]}"
    xml = (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
           "<os><type arch='x86_64' machine='q35'>hvm</type></os><devices>"
           "<controller type='usb' model='none'/><memballoon model='none'/></devices></domain>")
    domain = qemu_conn.defineXML(xml)
    try:
        started = virsh(sim, "start", name)
        assert started.returncode == 0, started.stderr
    finally:
        if domain.isActive():
            domain.destroy()
        domain.undefine()


def test_define_records_the_td_and_undefine_forgets_it(sim, qemu_conn):
    from tdxvirt.domain.record import local_store

    name = f"rec-{uuid.uuid4().hex[:8]}"
    assert run("define", name, "--gpu", "38:00.0", "--allow-shared", "--memory", "512M",
               "--vcpus", "1").returncode == 0
    identity = qemu_conn.lookupByName(name).UUIDString()
    record = local_store().read(identity)
    assert record.name == name and record.gpus == ("0000:38:00.0",)
    assert record.loader.endswith("OVMF.inteltdx.ms.fd")  # the firmware libvirt chose
    assert virsh(sim, "list", "--all", "--title").stdout.count(f"{name} [TDX]") == 1
    assert run("undefine", name).returncode == 0
    assert local_store().read(identity) is None
    with pytest.raises(libvirt.libvirtError):
        qemu_conn.lookupByName(name)



def test_a_recorded_td_stays_listed_and_shown_without_its_marks(td, sim, qemu_conn, tmp_path):
    """virsh edit strips tdxvirt's metadata and the title: root's record still names it
    a TD (list, show), and repair puts the title GUIs show back."""
    import json

    edited_with_virsh(sim, td, tmp_path, "root.remove(root.find('metadata'))\n"
                                         "root.remove(root.find('title'))")
    assert any(line.startswith(td) for line in run("list").stdout.splitlines())
    shown = json.loads(run("show", td, "--json").stdout)
    assert shown["record"] == "recorded" and shown["title"] is None and shown["problems"] == []
    assert shown["mrtd"] and len(shown["mrtd"]) == 96  # root's record's, the metadata is gone
    repaired = run("repair", td)
    assert repaired.returncode == 0 and f"put back the title '{td} [TDX]'" in repaired.stdout
    assert f"{td} [TDX]" in virsh(sim, "list", "--all", "--title").stdout


def test_a_td_whose_gpu_is_not_in_cc_mode_is_refused_whoever_starts_it(td, sim, qemu_conn, cc_off):
    """The simulated H100 in CC mode off (as the real one reported): the hook reads it
    through the stand-in for NVIDIA's tool, as on a host with the real tool."""
    refused = virsh(sim, "start", td)
    assert "would not start safely: GPU 0000:38:00.0 has CC mode off" in refused.stderr
    assert "`tdxvirt gpu cc-mode 0000:38:00.0 --set on`" in refused.stderr
    assert not qemu_conn.lookupByName(td).isActive()


def test_the_users_own_qemu_arguments_are_recorded_and_accepted_others_refused(sim, qemu_conn, cc_on):
    """`define --qemu-arg` records the user's own arguments: show, start and the hook
    accept exactly those; one added later with virt-xml is refused; one that would
    change the TD is refused at define."""
    name = f"qa-{uuid.uuid4().hex[:6]}"
    refused = run("define", name, "--gpu", "38:00.0", "--allow-shared", "--qemu-arg", "-readconfig",
                  "--qemu-arg", "/tmp/x.cfg")
    assert refused.returncode == 2 and "--qemu-arg '-readconfig' would change" in refused.stderr
    defined = run("define", name, "--gpu", "38:00.0", "--allow-shared", "--memory", "512M", "--vcpus",
                  "1", "--qemu-arg", "-msg", "--qemu-arg", "timestamp=on")
    assert defined.returncode == 0, defined.stderr
    try:
        assert run("show", name, "--json").stdout.count('"problems": []') == 1
        started = virsh(sim, "start", name)
        assert started.returncode == 0, started.stderr
        virsh(sim, "destroy", name)
        virt_xml(sim, name, "--edit", "--qemu-commandline", "-msg guest-name=on")
        _refused(virsh(sim, "start", name), "did not write (-msg guest-name=on", "tdxvirt repair")
    finally:
        virsh(sim, "destroy", name)
        run("undefine", name)


def test_list_and_its_json_tell_one_truth_of_a_stripped_td(td, sim):
    """The table's `TDX !` is JSON's type TDX with problems; JSON's tdx says the XML
    lacks TDX now (it said only that, and looked like another answer)."""
    import json

    virt_xml(sim, td, "--edit", "--xml", "xpath.delete=./launchSecurity")
    row = next(line.split() for line in run("list").stdout.splitlines() if line.startswith(td))
    assert row[3:5] == ["TDX", "!"]  # NAME, "shut off", TYPE
    record = next(r for r in json.loads(run("list", "--json").stdout) if r["name"] == td)
    assert (record["type"], record["tdx"], bool(record["problems"])) == ("TDX", False, True)
    assert record["weakened"] is True  # the '!' itself, by name


def test_a_replaced_firmware_is_refused_by_the_emulated_hosts_libvirt_until_adopted(sim, qemu_conn,
                                                                                    cc_on):
    """Through libvirt's real hook on the emulated TDX host: the TD's firmware file (a copy
    in a directory the host shares, named with --ovmf) replaced by another firmware of the
    same size, then a FIFO, then removed: `virsh start` is refused each time naming the
    file; root reviews and adopts the replacement, and the TD starts."""
    import shutil
    import tempfile
    from pathlib import Path

    root = sim.chroot
    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    folder.chmod(0o755)  # QEMU (as libvirt-qemu) reads the firmware too, once the hook lets it
    firmware = folder / "OVMF.inteltdx.fd"
    firmware.write_bytes((root / "usr/share/ovmf/OVMF.inteltdx.ms.fd").read_bytes())
    name = f"td-{uuid.uuid4().hex[:8]}"
    defined = run("define", name, "--gpu", "38:00.0", "--allow-shared", "--memory", "1G",
                  "--vcpus", "1", "--ovmf", str(firmware))
    assert defined.returncode == 0, defined.stderr
    try:
        other = (root / "usr/share/ovmf/OVMF.fd").read_bytes()
        firmware.write_bytes(other)
        _refused(virsh(sim, "start", name), f"its firmware {firmware}", f"tdxvirt adopt {name}")
        firmware.unlink()
        os.mkfifo(firmware)
        _refused(virsh(sim, "start", name), "a FIFO", "put the recorded file back")
        firmware.unlink()
        _refused(virsh(sim, "start", name), "missing", "")
        assert not qemu_conn.lookupByName(name).isActive()
        firmware.write_bytes(other)
        assert "not the file recorded before" in run("adopt", name).stdout
        started = virsh(sim, "start", name)
        assert started.returncode == 0, started.stderr
    finally:
        run("destroy", name)
        run("undefine", name)
        shutil.rmtree(folder)


def test_a_replaced_qemu_is_shown_but_never_refuses_a_start(tmp_path):
    """QEMU is outside a TD's measurements and package upgrades replace it: its digest is
    recorded and a changed binary shown (`show`, `measure`), while the hook neither reads
    it nor refuses the start; a QEMU that cannot be read leaves no digest and no warning."""
    import hashlib

    root, _, store, files = _with_boot_files(tmp_path)
    (files / "qemu").write_bytes(b"\x7fELF qemu 10.2")
    devices = root.find("devices")
    emulator = devices.find("emulator")
    if emulator is None:
        emulator = etree.SubElement(devices, "emulator")
    emulator.text = str(files / "qemu")
    record = record_from(root, root.findtext("uuid"), host_path=str)
    assert record.emulator == str(files / "qemu")
    assert record.digests["emulator"] == {"sha256": hashlib.sha256(b"\x7fELF qemu 10.2").hexdigest(),
                                          "size": 14}
    store.write(record)
    (files / "qemu").write_bytes(b"\x7fELF qemu 10.2.1 (a security update)")
    [state] = [s for s in check_files(record) if s.field == "emulator"]
    assert state.state == "changed" and not state.wrong and state.describe().startswith("CHANGED")
    assert _refusal(root, store) is None  # the start goes on
    assert problems(DomainXML(root), record=record, files=check_files(record)) == []
    (files / "qemu").unlink()
    unread = []
    assert "emulator" not in record_from(root, record.uuid, host_path=str, unread=unread).digests
    assert unread == []
