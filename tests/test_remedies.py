"""A remedy printed in a message can be pasted as it is: it targets the host the failing
command targeted (issue 26: `--sim` and `-c` were dropped)."""

from __future__ import annotations

import pytest
from conftest import run_sim

from tdxvirt.cli import remedies


@pytest.fixture(autouse=True)
def reset():
    yield
    remedies.remember(False, (), None, False)


def test_sim_and_uri_and_host_root_are_carried():
    message = "'a' is no longer the TD; `tdxvirt repair a` puts it back (`tdxvirt show a`)"
    remedies.remember(True, (), None, False)
    assert remedies.targeted(message) == ("'a' is no longer the TD; `tdxvirt --sim repair a` puts "
                                          "it back (`tdxvirt --sim show a`)")
    remedies.remember(False, ("qemu:///system",), "/srv/root dir", False)
    assert "`tdxvirt -c qemu:///system --host-root '/srv/root dir' repair a`" in remedies.targeted(message)


def test_a_remote_hosts_own_commands_run_on_that_host():
    remedies.remember(False, ("qemu+ssh://h/system",), None, True)
    line = remedies.targeted("run `tdxvirt host setup` there, then `tdxvirt start a`")
    assert line == "run `tdxvirt host setup` there, then `tdxvirt -c qemu+ssh://h/system start a`"


def test_nothing_is_added_to_a_default_invocation_or_twice():
    message = "`tdxvirt repair a`"
    assert remedies.targeted(message) == message
    remedies.remember(True, (), None, False)
    assert remedies.targeted(remedies.targeted(message)) == "`tdxvirt --sim repair a`"


def test_a_refused_start_on_the_simulated_host_names_the_simulated_host(td, sim):
    from test_integrity import virt_xml

    virt_xml(sim, td, "--edit", "--xml", "xpath.delete=./launchSecurity")
    refused = run_sim("start", td)
    assert refused.returncode != 0
    assert f"`tdxvirt --sim repair {td}`" in refused.stderr, refused.stderr


def test_a_fleet_and_builds_get_nothing_added():
    remedies.remember(False, ("a", "b"), "/srv/root", False)
    assert remedies.targeted("`tdxvirt undefine` one") == "`tdxvirt undefine` one"
    remedies.remember(False, (), "/srv/root", False, fleet=True)
    assert remedies.targeted("`tdxvirt undefine` one") == "`tdxvirt undefine` one"
    remedies.remember(True, (), None, False)
    assert remedies.targeted("another `tdxvirt build run` is using it") == \
        "another `tdxvirt build run` is using it"


def test_a_virsh_remedy_asks_the_libvirt_the_command_asked(sim):
    """virsh alone asks qemu:///system; a pasted `virsh ...` remedy must ask the host the
    failing command asked (found with a TD's managed-save refusal on the simulated host)."""
    import shlex

    message = "remove it first (`virsh managedsave-remove td1`): a TD boots afresh"
    remedies.remember(True, (), None, False)
    assert f"`virsh -c {shlex.quote(sim.qemu_uri)} managedsave-remove td1`" in remedies.targeted(message)
    remedies.remember(False, ("qemu+ssh://h/system",), None, True)
    assert "`virsh -c qemu+ssh://h/system managedsave-remove td1`" in remedies.targeted(message)
    done = remedies.targeted("`virsh -c qemu:///x start a`")
    assert done == "`virsh -c qemu:///x start a`"  # a URI already there is left alone
    remedies.remember(False, (), None, False)
    assert remedies.targeted(message) == message  # the default host: virsh's own default
