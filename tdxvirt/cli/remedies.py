"""Remedies a user can paste: a `tdxvirt ...` command in a message targets the host the
failing command targeted (`--sim`, `-c URI`, `--host-root DIR`), not the default one.

Messages name remedies as plain `tdxvirt CMD`; the library that writes them does not
know how tdxvirt was invoked, so the command line adds its connection options when it
prints them. For a remote URI, commands that act on a host itself (host, gpu, build)
run on that host, so they are left as they are there (their messages say so). A
`virsh ...` remedy gets the libvirt URI the command used (`-c`, or the simulated host's),
as virsh alone would ask the default one."""

from __future__ import annotations

import re
import shlex

_REMEDY = re.compile(r"`tdxvirt (?!-c |--sim|--host-root|--connect)([a-z-]+)")
_ON_THE_HOST_ITSELF = {"host", "gpu"}
_NEVER = {"build"}  # builds run on this machine, whatever host a command targeted
_VIRSH = re.compile(r"`virsh (?!-c |--connect)")

_prefix: tuple[str, bool] = ("", False)  # (options, remote)
_virsh_uri = ""  # the URI a `virsh` remedy needs, when it is not virsh's default


def remember(sim: bool, connects: tuple[str, ...], host_root: str | None, remote: bool,
             fleet: bool = False) -> None:
    """The connection options of this invocation; none for several hosts (-c repeated or
    --fleet: a fleet's remedies are each host's own)."""
    global _prefix, _virsh_uri
    _virsh_uri = ""
    if fleet or len(connects) > 1:
        _prefix = ("", False)
        return
    if sim:
        from ..sim import layout

        _virsh_uri = layout().qemu_uri
    elif connects and "://" in connects[0]:
        _virsh_uri = connects[0]
    words = []
    if sim:
        words.append("--sim")
    elif len(connects) == 1:
        words += ["-c", connects[0]]
    if host_root:
        words += ["--host-root", host_root]
    _prefix = (shlex.join(words), remote and not sim)


def targeted(message: str) -> str:
    """``message`` with its `tdxvirt ...` remedies given this invocation's options."""
    options, remote = _prefix
    if _virsh_uri:
        message = _VIRSH.sub(f"`virsh -c {shlex.quote(_virsh_uri)} ", message)
    if not options:
        return message

    def add(match: re.Match) -> str:
        command = match.group(1)
        if command in _NEVER or remote and command in _ON_THE_HOST_ITSELF:
            return match.group(0)
        return f"`tdxvirt {options} {command}"

    return _REMEDY.sub(add, message)
