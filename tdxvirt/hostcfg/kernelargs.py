"""Kernel arguments for the next boot: ``/etc/default/grub``'s GRUB_CMDLINE_LINUX, or grubby.

Only GRUB_CMDLINE_LINUX is edited, and only inside its quotes: every other byte of
/etc/default/grub stays. An argument already present with another value
(``intel_iommu=off``) is replaced where it stands; a missing one is appended. Shell
expansions in the value (``$VAR``, backquotes, backslashes) are refused, since their
meaning is only known when grub-mkconfig runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import HostNotReadyError
from ..host.cmdline import arg_name, split_args

GRUB_DEFAULTS = "/etc/default/grub"
VARIABLE = "GRUB_CMDLINE_LINUX"

# What a TD host with passed-through GPUs boots with (source document + Canonical):
# the IOMMU on (in passthrough mode for host devices), KVM's TDX on for a built-in
# kvm_intel (a module also gets the modprobe.d option), and no hibernation, which
# would lose TD private memory.
TDX_HOST_ARGS = ("intel_iommu=on", "iommu=pt", "kvm_intel.tdx=on", "nohibernate")

_ASSIGNMENT = re.compile(
    rf"^(?P<lead>[ \t]*(?:export[ \t]+)?{VARIABLE}=)(?P<rhs>.*)$", re.MULTILINE)


class GrubDefaultsError(HostNotReadyError):
    """/etc/default/grub cannot be edited safely; nothing was written."""


def missing_args(tokens: list[str], wanted: tuple[str, ...]) -> list[str]:
    """The wanted arguments not present with exactly that value (last one wins)."""
    missing = []
    for want in wanted:
        last = None
        for token in tokens:
            if arg_name(token) == arg_name(want):
                last = token
        if last != want:
            missing.append(want)
    return missing


def apply_args(value: str, wanted: tuple[str, ...]) -> str:
    """A command line with ``wanted`` set: replaced in place, else appended."""
    tokens = split_args(value)
    result = value
    additions = []
    for want in missing_args(tokens, wanted):
        positions = [m for m in re.finditer(r'(?:[^\s"]+|"[^"]*")+', result)
                     if arg_name(m.group()) == arg_name(want)]
        if positions:
            last = positions[-1]
            result = result[:last.start()] + want + result[last.end():]
        else:
            additions.append(want)
    if additions:
        result = (result.rstrip() + " " if result.strip() else "") + " ".join(additions)
    return result


@dataclass(frozen=True)
class _Rhs:
    value: str
    quote: str  # '"', "'" or "" (bare word)
    start: int  # offsets of the value inside the whole text
    end: int


def _parse_rhs(text: str, match: re.Match, line: int) -> _Rhs:
    rhs = match["rhs"]
    base = match.start("rhs")
    quote = rhs[:1] if rhs[:1] in ('"', "'") else ""
    if quote:
        close = rhs.find(quote, 1)
        if close < 0:
            raise GrubDefaultsError(
                f"{GRUB_DEFAULTS} line {line}: {VARIABLE}'s quote is not closed on its "
                "line; fix it by hand (tdxvirt changed nothing)")
        value = rhs[1:close]
        start, end = base + 1, base + close
    else:
        value = re.match(r"[^\s#;]*", rhs).group()
        start, end = base, base + len(value)
    if quote != "'" and any(c in value for c in "$`\\"):
        raise GrubDefaultsError(
            f"{GRUB_DEFAULTS} line {line}: {VARIABLE} uses shell expansions; add "
            f"{' '.join(TDX_HOST_ARGS)} to it by hand (tdxvirt changed nothing)")
    return _Rhs(value, quote, start, end)


def current_grub_args(text: str) -> list[str] | None:
    """GRUB_CMDLINE_LINUX's arguments (the last assignment wins, as in the shell)."""
    matches = list(_ASSIGNMENT.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    return split_args(_parse_rhs(text, last, text.count("\n", 0, last.start()) + 1).value)


def edit_grub_defaults(text: str, wanted: tuple[str, ...] = TDX_HOST_ARGS) -> str:
    """/etc/default/grub with ``wanted`` in GRUB_CMDLINE_LINUX; all else byte for byte."""
    matches = list(_ASSIGNMENT.finditer(text))
    if not matches:
        line = f'{VARIABLE}="{" ".join(wanted)}"\n'
        return text + ("\n" if text and not text.endswith("\n") else "") + line
    last = matches[-1]
    rhs = _parse_rhs(text, last, text.count("\n", 0, last.start()) + 1)
    new_value = apply_args(rhs.value, wanted)
    if new_value == rhs.value:
        return text
    if rhs.quote:
        return text[:rhs.start] + new_value + text[rhs.end:]
    return text[:rhs.start] + f'"{new_value}"' + text[rhs.end:]


def parse_grubby_info(output: str) -> list[list[str]]:
    """The ``args="..."`` of every kernel in ``grubby --info=ALL`` output."""
    kernels = []
    for line in output.splitlines():
        if line.startswith("args="):
            value = line[len("args="):].strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            kernels.append(split_args(value))
    return kernels


def grubby_command(args: list[str], remove: bool = False) -> tuple[str, ...]:
    option = "--remove-args" if remove else "--args"
    return ("grubby", "--update-kernel=ALL", f"{option}={' '.join(args)}")
