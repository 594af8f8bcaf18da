"""Issue #18, item 6: nothing from libvirt drives the terminal.

libvirt accepts CR, ESC, the C1 CSI (U+009B) and bidi overrides (U+202E) in a domain
name (virDomainRename takes even ESC) and CR/LF in metadata. Printed raw, they repaint
the screen, forge rows in `list` and `gpu list`, and forge an "overlay:" line in `show`.
Every such value is escaped in text and table output; JSON carries it exactly.
"""

from __future__ import annotations

import json
import unicodedata
import uuid

import libvirt
import pytest
from conftest import discard
from lxml import etree

from tdxvirt.domain.domainxml import NAMESPACE
from tdxvirt.domain.spec import TDSpec
from tdxvirt.lifecycle import tds
from tdxvirt.textsafe import safe, table, xml_parsable

METADATA_ELEMENT = 2  # VIR_DOMAIN_METADATA_ELEMENT
# Clear the screen, paint red, return to column 0, forge a row, then C1 CSI and RLO.
HOSTILE = ("\x1b[2J\x1b[31m\rforged-td  running  TDX  native  64  1 MiB  -  0h00m\n"
           "\u009b0m\u202eevil\u2028x")


def _terminal_controls(text: str) -> list[str]:
    """Characters a terminal would act on (line feeds between lines are ours)."""
    return [c for c in text if c != "\n" and unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]


@pytest.fixture
def hostile_td(conn, gpu_host):
    """A tdxvirt TD renamed through libvirt's API to a hostile name; (domain, name, gpu)."""
    host, gpu = gpu_host
    plain = f"t-{uuid.uuid4().hex[:10]}"
    tds.define_td(conn, host, TDSpec.from_user(name=plain, gpus=[gpu]))
    domain = conn.lookupByName(plain)
    name = plain + HOSTILE
    domain.rename(name, 0)
    domain = conn.lookupByUUIDString(domain.UUIDString())
    assert domain.name() == name  # libvirt took it as is
    yield domain, name, gpu
    try:
        if domain.isActive():
            domain.destroy()
        domain.undefine()
    except libvirt.libvirtError:
        pass  # gone already (a transient domain vanishes when destroyed)


def test_list_escapes_a_hostile_name_and_no_row_is_forged(run, hostile_td):
    domain, name, _ = hostile_td
    result = run("list")
    assert result.exit_code == 0, result.output
    assert _terminal_controls(result.stdout) == []
    assert safe(name) in result.stdout
    assert "\\x1b[2J" in result.stdout and "\\u202e" in result.stdout and "\\x9b" in result.stdout
    rows = [line for line in result.stdout.splitlines() if "forged-td" in line and name[:12] in line]
    assert len(rows) == 1 and rows[0].startswith(name[:12])  # inside the real row, not one of its own
    assert not any(line.startswith("forged-td") for line in result.stdout.splitlines())


def test_list_json_keeps_the_exact_name(run, hostile_td):
    _, name, _ = hostile_td
    records = json.loads(run("list", "--json").stdout)
    assert name in [r["name"] for r in records]


def test_show_escapes_the_name_and_forged_metadata_lines(run, conn, hostile_td, tmp_path):
    domain, name, _ = hostile_td
    forged = "/var/lib/libvirt/images/x.qcow2\r\noverlay:            /etc/shadow"
    mark = etree.fromstring(domain.metadata(METADATA_ELEMENT, NAMESPACE).encode())
    for element in mark.iter():
        element.tag = f"{{{NAMESPACE}}}" + etree.QName(element).localname
    etree.SubElement(mark, f"{{{NAMESPACE}}}overlay").text = forged
    domain.setMetadata(METADATA_ELEMENT, etree.tostring(mark).decode(), "tdxvirt", NAMESPACE, 0)
    result = run("show", domain.UUIDString())
    assert result.exit_code == 0, result.output
    assert _terminal_controls(result.stdout) == []
    lines = result.stdout.splitlines()
    # metadata's overlay is named only beside the disk it is: a forged one, no disk of the
    # domain, is never printed, so it cannot forge a line either
    assert "/etc/shadow" not in result.stdout and "x.qcow2" not in result.stdout
    assert any(line.startswith("Name:") and safe(name) in line for line in lines)
    shown = json.loads(run("show", domain.UUIDString(), "--json").stdout)
    assert shown["name"] == name


def test_gpu_list_escapes_the_holding_tds_name(run, hostile_td):
    _, name, gpu = hostile_td
    result = run("gpu", "list")
    assert result.exit_code == 0, result.output
    assert _terminal_controls(result.stdout) == []
    assert safe(name) in result.stdout
    row = [line for line in result.stdout.splitlines() if line.startswith(gpu)]
    assert len(row) == 1


def test_define_and_lifecycle_messages_survive_the_hostile_domain(run, conn, hostile_td,
                                                                  td_name):
    """lxml refuses XML with a raw ESC; one such domain must not break define for all
    (gpu_holders reads every domain's XML), and every message naming it is escaped."""
    domain, name, _ = hostile_td
    result = run("define", td_name, "--print-xml")
    assert result.exit_code == 0, result.output
    # (not started: libvirt's own parser refuses the ESC when it starts a domain)
    started = run("reboot", domain.UUIDString())
    assert started.exit_code == 1 and started.output.count("\n") == 1
    assert started.output.startswith("tdxvirt: error: ") and "is not running" in started.output
    destroyed = run("destroy", domain.UUIDString())
    assert destroyed.stdout.strip() == (f"'{safe(name)}' (UUID {domain.UUIDString()}) is not "
                                        "running; nothing to do")
    autostart = run("autostart", domain.UUIDString(), "--disable")
    assert autostart.stdout.strip() == f"Autostart of '{safe(name)}' disabled"
    assert _terminal_controls(started.output + destroyed.output + autostart.output) == []


def test_a_running_td_with_a_hostile_name_is_escaped_too(run, conn, gpu_host):
    """CR, C1 CSI and RLO survive libvirt's own XML, so such a TD runs."""
    host, gpu = gpu_host
    plain = f"t-{uuid.uuid4().hex[:10]}"
    tds.define_td(conn, host, TDSpec.from_user(name=plain, gpus=[gpu]))
    domain = conn.lookupByName(plain)
    name = plain + "\rforged\u009b2J\u202eevil"
    domain.rename(name, 0)
    domain = conn.lookupByUUIDString(domain.UUIDString())
    try:
        started = run("start", domain.UUIDString(), "--skip-preflight")
        assert started.exit_code == 0, started.output
        assert started.stdout.strip() == f"Started '{safe(name)}'"
        listed = run("list")
        assert _terminal_controls(listed.stdout) == [] and safe(name) in listed.stdout
        refused = run("undefine", domain.UUIDString())
        assert refused.exit_code == 1 and refused.output.count("\n") == 1
        assert _terminal_controls(refused.output) == []
        destroyed = run("destroy", domain.UUIDString())
        assert destroyed.stdout.strip() == f"Destroyed '{safe(name)}' (UUID {domain.UUIDString()})"
        # libvirt re-read its XML at the start: the CR in the name is an LF now
        name = conn.lookupByUUIDString(domain.UUIDString()).name()
        assert "\n" in name
        undefined = run("undefine", domain.UUIDString())
        assert undefined.stdout.strip() == f"Undefined '{safe(name)}' (UUID {domain.UUIDString()})"
        assert _terminal_controls(undefined.output) == []
    finally:
        discard(domain)


def test_safe_escapes_every_control_and_format_character():
    assert safe("a\x1b[31mb\rc\nd\u009be\u202ef\u200bg\\h\u2028") == \
        "a\\x1b[31mb\\x0dc\\x0ad\\x9be\\u202ef\\u200bg\\\\h\\u2028"
    assert safe("td-38-00-0") == "td-38-00-0" and safe("déjà vu") == "déjà vu"
    assert xml_parsable("<n>a\x1bb</n>") == "<n>a\ufffdb</n>"


def test_tables_never_reformat_a_name_that_looks_like_a_number():
    text = table([["1.50", 2], ["1e5", 16]], ["NAME", "VCPUS"])
    assert "1.50" in text and "1e5" in text and "100000" not in text
