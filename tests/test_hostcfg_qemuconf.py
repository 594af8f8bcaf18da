"""The qemu.conf editor on the real qemu.conf files libvirt ships, checked by libvirt's lens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hostcfg_realfiles import (
    FORKY_LENSES,
    FORKY_QEMU_CONF,
    augeas_load,
    shipped_qemu_conf,
)

from tdxvirt.errors import InputError
from tdxvirt.hostcfg.qemuconf import QemuConf, QemuConfSyntaxError, edit, format_value

TD_SETTINGS = {"user": "root", "group": "kvm", "dynamic_ownership": 0, "security_driver": "none"}


def _changed_lines(before: bytes, after: bytes) -> list[tuple[str, str]]:
    old, new = before.split(b"\n"), after.split(b"\n")
    assert len(old) == len(new), "lines were added or removed"
    return [(a.decode(), b.decode()) for a, b in zip(old, new) if a != b]


@pytest.fixture(params=["debian-release", "forky-12.8"])
def real_conf(request):
    """(bytes of a real shipped qemu.conf, the lens directory of the same libvirt)."""
    if request.param == "forky-12.8":
        return FORKY_QEMU_CONF.read_bytes(), FORKY_LENSES
    from test_hostcfg_realfiles import shipped_lenses

    return shipped_qemu_conf().read_bytes(), shipped_lenses()


def test_commented_defaults_are_replaced_in_place(real_conf, tmp_path):
    data, lenses = real_conf
    result = edit(data, TD_SETTINGS)
    assert _changed_lines(data, result) == [
        ('#security_driver = "selinux"', 'security_driver = "none"'),
        ('#user = "libvirt-qemu"', 'user = "root"'),
        ('#group = "libvirt-qemu"', 'group = "kvm"'),
        ("#dynamic_ownership = 1", "dynamic_ownership = 0"),
    ]
    loaded = augeas_load(result, lenses, tmp_path)
    assert {k: loaded[k] for k in TD_SETTINGS} == {
        "user": "root", "group": "kvm", "dynamic_ownership": "0", "security_driver": "none"}


def test_second_edit_changes_nothing(real_conf):
    data, _ = real_conf
    once = edit(data, TD_SETTINGS)
    assert edit(once, TD_SETTINGS) == once


def test_active_values_are_replaced_keeping_their_line(tmp_path):
    data = FORKY_QEMU_CONF.read_bytes() + (
        b'  user = "libvirt-qemu"   # set by hand\n'
        b'security_driver = [ "selinux",\n    "apparmor" ]\n'
        b"dynamic_ownership=1\n")
    result = edit(data, TD_SETTINGS)
    assert result.endswith(b'\n  user = "root"   # set by hand\n'
                           b'security_driver = "none"\n'
                           b"dynamic_ownership=0\n")
    # The commented defaults of the three active settings stay as they were.
    for default in (b'\n#user = "libvirt-qemu"\n', b'\n#security_driver = "selinux"\n',
                    b"\n#dynamic_ownership = 1\n"):
        assert default in result
    # group had only its commented default: replaced there, not appended.
    assert result.count(b'group = "kvm"') == 1 and b'\ngroup = "kvm"\n' in result
    assert augeas_load(result.replace(b"   # set by hand", b""), FORKY_LENSES, tmp_path)["user"] == "root"


def test_settings_the_file_never_mentions_are_appended():
    assert edit(b"# nothing here", {"user": "root"}) == b'# nothing here\nuser = "root"\n'
    assert edit(b"", {"dynamic_ownership": 0}) == b"dynamic_ownership = 0\n"


def test_indented_examples_are_not_taken_for_the_default():
    text = b'#       user = "qemu"   # A user named "qemu"\n#\n#user = "libvirt-qemu"\n'
    assert edit(text, {"user": "root"}) == (
        b'#       user = "qemu"   # A user named "qemu"\n#\nuser = "root"\n')


def test_bytes_that_are_not_utf8_survive():
    data = b"# caf\xe9 \xff\n#user = \"x\"\n"
    assert edit(data, {"user": "root"}) == b"# caf\xe9 \xff\nuser = \"root\"\n"


def test_crlf_and_single_quotes_and_semicolons_parse():
    conf = QemuConf.parse(b"user = 'root';\r\ngroup = \"kvm\" # c\r\nmax_files = -1\r\n")
    assert [(e.key, e.value) for e in conf.entries] == [
        ("user", "root"), ("group", "kvm"), ("max_files", -1)]


def test_multiline_triple_quoted_string_and_list_with_comments():
    conf = QemuConf.parse(b'x = """a\nb"""\nacl = [\n  "/dev/null", # first\n  "/dev/kvm",\n]\n')
    assert conf.get("x") == "a\nb"
    assert conf.get("acl") == ["/dev/null", "/dev/kvm"]


@pytest.mark.parametrize("text, line, what", [
    (b'# ok\nuser = "root\n', 2, "unterminated string"),
    (b"a = 1\n\nuser = 'root\n", 3, "unterminated string"),
    (b'acl = [\n "/dev/null",\n', 1, "unterminated list"),
    (b'acl = [ "/dev/null" "/dev/kvm" ]\n', 1, "expected ',' or ']'"),
    (b'user = "a"\ngroup = "b"\nuser = "c"\n', 3, "'user' is set twice (also on line 1)"),
    (b"user root\n", 1, "expected '=' after 'user'"),
    (b"= 3\n", 1, "expected a setting name"),
    (b"user = root\n", 1, "'user' has no valid value"),
    (b'user = "a" "b"\n', 1, "unexpected text after the value of 'user'"),
    (b'x = """never closed\n', 1, "unterminated string"),
])
def test_malformed_input_names_the_line(text, line, what):
    with pytest.raises(QemuConfSyntaxError) as caught:
        edit(text, TD_SETTINGS, source="/etc/libvirt/qemu.conf")
    message = str(caught.value)
    assert message.startswith(f"/etc/libvirt/qemu.conf line {line}: ")
    assert what in message and "\n" not in message


@pytest.mark.parametrize("value", ['ro"ot', "a\nb", ""])
def test_values_libvirt_cannot_hold_are_refused(value):
    with pytest.raises(InputError, match="no escapes"):
        edit(b"", {"user": value})


def test_format_follows_libvirt():
    assert format_value("dynamic_ownership", 0) == "0"
    assert format_value("dynamic_ownership", False) == "0"
    assert format_value("user", "+0") == '"+0"'
    assert format_value("namespaces", []) == "[  ]"
    assert format_value("cgroup_device_acl", ["/dev/a", "/dev/b"]) == '[ "/dev/a", "/dev/b" ]'


_NAMES = st.from_regex(r"\+?[A-Za-z_][A-Za-z0-9_.-]{0,30}", fullmatch=True)


@settings(max_examples=25, deadline=None)
@given(user=_NAMES, group=_NAMES, ownership=st.integers(0, 1))
def test_any_valid_identity_round_trips_and_only_its_lines_change(user, group, ownership):
    data = FORKY_QEMU_CONF.read_bytes()
    wanted = {"user": user, "group": group, "dynamic_ownership": ownership}
    result = edit(data, wanted)
    conf = QemuConf.parse(result)
    assert {k: conf.get(k) for k in wanted} == wanted
    assert len(_changed_lines(data, result)) == 3
    assert edit(result, wanted) == result
