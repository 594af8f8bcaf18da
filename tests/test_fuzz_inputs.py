"""Random and adversarial input to every command that takes some (issue 8).

Each example must end in exit 0 or tdxvirt's one-line error with exit 2 (1 where
the host or libvirt is at fault), never a traceback, and must change nothing: the
define examples use --print-xml, so even a valid one defines nothing, and the
domain list is compared before and after. Bounded by hypothesis' example counts.
"""

from __future__ import annotations

import string

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from tdxvirt.cli import main
from tdxvirt.errors import TdxvirtError

NASTY = st.one_of(
    st.text(max_size=80),
    st.text(alphabet="<>&'\"`$;|\\/\n\r\t .:*?[]{}()!#%", max_size=40),
    st.text(min_size=200, max_size=5000),
    st.sampled_from(["", "..", "../../etc/passwd", "/dev/null", "-1", "0x", "38:00.0\x00",
                     "é", "\u202e", "𝔁", "--help", "-c", "0000:38:00.0 0000:39:00.0",
                     "/proc/self/root/etc/shadow", "${HOME}", "$(reboot)", "`id`"]),
).filter(lambda text: "\x00" not in text)  # argv cannot carry NUL; the parsers get it below

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def _domain_names(conn):
    return sorted(d.name() for d in conn.listAllDomains(0))


def _assert_clean(result, allowed=(0, 1, 2)):
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in allowed, (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    if result.exit_code != 0:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("tdxvirt: error: "), result.stderr


OPTIONS = ["--gpu", "--vcpus", "--memory", "--image", "--disk", "--kernel", "--ovmf", "--qemu",
           "--dialect", "--policy", "--mr-config-id", "--mr-owner", "--qgs", "--network",
           "--ssh-port", "--hugepages", "--numa", "--virt-type", "--ssh-key", "--user-data",
           "--qemu-arg"]


@pytest.fixture(scope="module")
def fuzz_host(tmp_path_factory):
    from tdxvirt.sim.hostroot import build_host_root

    return build_host_root(tmp_path_factory.mktemp("fuzz") / "root")


@FUZZ
@given(option=st.sampled_from(OPTIONS), value=NASTY, name=st.one_of(st.none(), NASTY))
def test_define_any_option_value(option, value, name, conn, sim_uri, fuzz_host):
    before = _domain_names(conn)
    args = ["-c", sim_uri, "--host-root", str(fuzz_host.base), "define"]
    args += [] if name is None else [name]
    args += ["--gpu", "38:00.0", option, value, "--print-xml", "--allow-shared"]
    result = CliRunner().invoke(main, args)
    _assert_clean(result)
    if result.exit_code == 0 and not result.stdout.startswith("Usage:"):  # "--help" as NAME
        # valid: the XML is well formed and the name not injected
        root = etree.fromstring(result.stdout.encode())
        if name is not None:
            assert root.findtext("name") == name
    assert _domain_names(conn) == before


@FUZZ
@given(command=st.sampled_from(["start", "stop", "destroy", "undefine", "show", "xml",
                                "reboot", "autostart"]), name=NASTY)
def test_lifecycle_commands_any_name(command, name, conn, sim_uri):
    before = _domain_names(conn)
    result = CliRunner().invoke(main, ["-c", sim_uri, command, name])
    _assert_clean(result)
    assert _domain_names(conn) == before or result.exit_code == 0


@FUZZ
@given(uri=NASTY)
def test_any_uri(uri):
    result = CliRunner().invoke(main, ["-c", uri, "list"])
    _assert_clean(result)


@FUZZ
@given(args=st.lists(NASTY, max_size=4))
def test_gpu_commands_any_arguments(args, sim_uri, fuzz_host):
    for command in (["gpu", "detach", "--dry-run"], ["gpu", "cc-mode", "--dry-run"]):
        result = CliRunner().invoke(main, ["-c", sim_uri, "--host-root", str(fuzz_host.base),
                                           *command, *args])
        _assert_clean(result)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=400) | st.binary(max_size=400).map(lambda b: b.decode("latin-1")))
def test_qemu_conf_editor_any_content(text):
    from tdxvirt.hostcfg.qemuconf import edit

    try:
        edited = edit(text.encode("utf-8", "surrogateescape"), {"user": "libvirt-qemu",
                                                                 "dynamic_ownership": 0})
    except TdxvirtError as error:
        assert "\n" not in str(error)
    else:
        assert b'user = "libvirt-qemu"' in edited


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=300))
def test_build_manifest_any_content(tmp_path_factory, text):
    from tdxvirt.build import manifest

    path = tmp_path_factory.mktemp("m") / "manifest.toml"
    path.write_text(text)
    try:
        manifest.load(path)
    except TdxvirtError as error:
        assert "\n" not in str(error)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=300))
def test_config_file_any_content(tmp_path_factory, text, monkeypatch_session):
    from tdxvirt.config import load_config

    path = tmp_path_factory.mktemp("c") / "config.toml"
    path.write_text(text)
    monkeypatch_session.setenv("TDXVIRT_CONFIG", str(path))
    try:
        load_config()
    except TdxvirtError as error:
        assert "\n" not in str(error)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=string.printable + "\x00é𝔁", max_size=60))
def test_every_parser_raises_only_input_errors(text):
    from tdxvirt.domain.spec import validate_name
    from tdxvirt.domain.tdx_options import parse_measurement, parse_policy, parse_qgs
    from tdxvirt.pci import PciAddress
    from tdxvirt.units import parse_size

    for parse in (PciAddress.parse, validate_name, parse_size, parse_policy, parse_qgs,
                  lambda t: parse_measurement(t, "--mr-owner")):
        try:
            parse(text)
        except TdxvirtError as error:
            assert "\n" not in str(error)


@pytest.fixture(scope="module")
def monkeypatch_session():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()
