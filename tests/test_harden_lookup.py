"""Issue #18, item 5: domains are looked up as virsh does, and never by a guess.

libvirt lets a domain be *named* like another domain's UUID or like a running domain's
ID. tdxvirt tries ID, then UUID, then name (virsh's order), refuses an argument that
matches different domains by different keys, acts on the domain it resolved (handing
its UUID to `virsh console`), and echoes name and UUID in destroy and undefine.
"""

from __future__ import annotations

import uuid

import pytest
from click.testing import CliRunner
from conftest import discard

from tdxvirt.cli import main
from tdxvirt.errors import InputError
from tdxvirt.lifecycle import tds

MINIMAL = ("<domain type='test'><name>{name}</name><memory>524288</memory>"
           "<os><type>hvm</type></os></domain>")


@pytest.fixture
def defined(conn):
    """Defines test-driver domains by name; undefines them afterwards."""
    made = []

    def define(name: str):
        domain = conn.defineXML(MINIMAL.format(name=name))
        made.append(domain)
        return domain

    yield define
    for domain in made:
        discard(domain)


@pytest.fixture
def run(sim_uri):
    def invoke(*args):
        result = CliRunner().invoke(main, ["-c", sim_uri, *args])
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert "Traceback" not in result.output
        return result

    return invoke


def _names(conn):
    return {d.name() for d in conn.listAllDomains(0)}


def test_a_domain_named_like_anothers_uuid_captures_nothing(run, conn, defined):
    victim = defined(f"t-victim-{uuid.uuid4().hex[:8]}")
    decoy = defined(victim.UUIDString())  # named like the victim's UUID
    for command in (["show", victim.UUIDString()], ["undefine", victim.UUIDString(), "--remove-storage"],
                    ["destroy", victim.UUIDString()], ["console", victim.UUIDString()],
                    ["xml", victim.UUIDString()]):
        result = run(*command)
        assert result.exit_code == 2, (command, result.output)
        lines = result.output.splitlines()
        assert len(lines) == 1 and "matches different domains" in lines[0]
        assert victim.name() in lines[0] and decoy.UUIDString() in lines[0]
    assert {victim.name(), victim.UUIDString()} <= _names(conn)
    # each is still reachable by a handle only it has
    assert tds.lookup(conn, victim.name()).UUIDString() == victim.UUIDString()
    assert tds.lookup(conn, decoy.UUIDString()).name() == victim.UUIDString()


def test_a_domain_named_like_a_running_domains_id_is_refused(run, conn, defined):
    running = defined(f"t-run-{uuid.uuid4().hex[:8]}")
    running.create()
    decoy = defined(str(running.ID()))
    result = run("destroy", str(running.ID()))
    assert result.exit_code == 2 and "matches different domains" in result.output
    assert f"by ID it is '{running.name()}'" in result.output
    assert f"by name it is '{decoy.name()}'" in result.output
    assert running.isActive()


def test_the_order_is_id_then_uuid_then_name_and_one_domain_by_two_keys_is_fine(conn, defined):
    domain = defined(f"t-one-{uuid.uuid4().hex[:8]}")
    domain.create()
    assert tds.lookup(conn, str(domain.ID())).UUIDString() == domain.UUIDString()
    assert tds.lookup(conn, domain.UUIDString()).name() == domain.name()
    assert tds.lookup(conn, domain.name()).UUIDString() == domain.UUIDString()
    assert tds.lookup(conn, domain) is domain  # a resolved domain is used as is


def test_ambiguity_is_an_input_error_naming_every_match(conn, defined):
    victim = defined(f"t-v-{uuid.uuid4().hex[:8]}")
    defined(victim.UUIDString())
    with pytest.raises(InputError) as error:
        tds.lookup(conn, victim.UUIDString())
    assert "by UUID it is" in str(error.value) and "by name it is" in str(error.value)
    assert "\n" not in str(error.value)


def test_console_hands_virsh_the_resolved_uuid(run, conn, defined, monkeypatch):
    domain = defined(f"t-con-{uuid.uuid4().hex[:8]}")
    calls = []
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/virsh")
    monkeypatch.setattr("os.execv", lambda path, argv: calls.append(argv))
    result = run("console", domain.name())
    assert result.exit_code == 0, result.output
    assert calls == [["/usr/bin/virsh", "-c", conn.getURI(), "console", domain.UUIDString()]]


def test_destroy_and_undefine_echo_the_name_and_uuid(run, conn, defined):
    domain = defined(f"t-echo-{uuid.uuid4().hex[:8]}")
    name, uid = domain.name(), domain.UUIDString()
    domain.create()
    result = run("destroy", uid)
    assert result.exit_code == 0
    assert result.stdout.strip() == f"Destroyed '{name}' (UUID {uid})"
    result = run("destroy", name)
    assert result.stdout.strip() == f"'{name}' (UUID {uid}) is not running; nothing to do"
    result = run("undefine", uid)
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0] == f"Undefined '{name}' (UUID {uid})"
    assert name not in _names(conn)


def test_an_unknown_argument_is_one_line(run):
    result = run("show", "no-such-td-" + uuid.uuid4().hex)
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "no domain named" in result.output and "nor with that ID or UUID" in result.output
