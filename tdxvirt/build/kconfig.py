"""Kernel configuration: the kernel's own scripts/config + olddefconfig, then a check.

Kconfig silently drops a symbol whose dependencies are not met (INTEL_TDX_HOST needs
X86_X2APIC, CONTIG_ALLOC, no KEXEC_CORE ...), so after ``make olddefconfig`` every
requested symbol is read back from ``.config`` and any that did not end up as asked
is named, with the ``depends on`` lines of its Kconfig entry that are not met.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..kconfig import parse_kernel_config
from . import BuildFailedError

_SIMPLE_DEP = re.compile(r"(!?)([A-Z0-9_]+)")
WANTED = {"enable": "y", "module": "m", "disable": "n"}


def scripts_config_argv(config_file: str, enable=(), module=(), disable=()) -> list[str]:
    """The command line of the kernel's scripts/config for the requested symbols."""
    argv = ["scripts/config", "--file", config_file]
    for option, names in (("--enable", enable), ("--module", module), ("--disable", disable)):
        for name in names:
            argv += [option, name]
    return argv


# Key files a distribution's config names inside its own packaging tree (Debian:
# "debian/certs/debian-uefi-certs.pem", Ubuntu: "debian/canonical-certs.pem"): not in a
# kernel.org tree, so the build would stop at its very end with "No rule to make target".
DISTRIBUTION_KEY_SYMBOLS = ("SYSTEM_TRUSTED_KEYS", "SYSTEM_REVOCATION_KEYS")


def distribution_key_files(config_file: str | Path) -> list[str]:
    """The key symbols of a (distribution) config naming a file in a relative folder
    other than the kernel's own certs/ (those are emptied: the kernel's defaults)."""
    values = read_config(config_file)
    found = []
    for symbol in DISTRIBUTION_KEY_SYMBOLS:
        value = values.get(symbol, "").strip('"')
        if value and not value.startswith("/") and not value.startswith("certs/"):
            found.append(symbol)
    return found


def clear_strings_argv(config_file: str, symbols) -> list[str]:
    argv = ["scripts/config", "--file", config_file]
    for symbol in symbols:
        argv += ["--set-str", symbol, ""]
    return argv


def read_config(path: str | Path) -> dict[str, str]:
    """Symbol -> value from a .config: 'y', 'm', 'n' (unset) or the literal value."""
    return parse_kernel_config(Path(path).read_text(errors="replace")).values


@dataclass(frozen=True)
class Mismatch:
    symbol: str
    wanted: str  # y, m or n
    got: str  # y, m, n or a value; n also when Kconfig removed the symbol entirely


def mismatches(config: dict[str, str], enable=(), module=(), disable=()) -> list[Mismatch]:
    found = []
    for state, names in (("enable", enable), ("module", module), ("disable", disable)):
        for name in names:
            got = config.get(name, "n")
            if got != WANTED[state]:
                found.append(Mismatch(name, WANTED[state], got))
    return found


class KconfigTree:
    """The Kconfig files of a kernel tree, read once, to explain a dropped symbol."""

    _SOURCE = re.compile(r'^\s*(o?r?source|osource|rsource)\s+"([^"]+)"')

    def __init__(self, tree: str | Path, srcarch: str = "x86"):
        self.tree = Path(tree)
        self.srcarch = srcarch
        self.files: dict[str, list[str]] = {}
        for directory, subdirs, names in os.walk(self.tree):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            for name in sorted(names):
                if name.startswith("Kconfig"):
                    path = Path(directory) / name
                    self.files[str(path.relative_to(self.tree))] = path.read_text(errors="replace").splitlines()
        self.sourced_from: dict[str, tuple[str, int]] = {}
        for rel, lines in self.files.items():
            for number, line in enumerate(lines):
                if match := self._SOURCE.match(line):
                    target = match.group(2).replace("$(SRCARCH)", srcarch)
                    if match.group(1).startswith("r") or match.group(1) == "orsource":
                        target = os.path.normpath(os.path.join(os.path.dirname(rel), target))
                    self.sourced_from.setdefault(target, (rel, number))

    _CONFIG = re.compile(r"^\s*(?:menu)?config\s+([A-Za-z0-9_]+)\s*$")
    _SELECT = re.compile(r"^\s+select\s+([A-Za-z0-9_]+)")

    def selectors(self, symbol: str) -> list[str]:
        """The symbols whose entries ``select SYMBOL`` (a selected symbol cannot be
        turned off by hand: what selects it must go)."""
        found = []
        for lines in self.files.values():
            current = None
            for line in lines:
                if match := self._CONFIG.match(line):
                    current = match.group(1)
                elif not line[:1].isspace() and line.strip():
                    current = None  # if/endif/menu/source/choice: no longer inside an entry
                elif current and (match := self._SELECT.match(line)) and match.group(1) == symbol:
                    found.append(current)
        return sorted(set(found))

    def entry(self, symbol: str) -> tuple[str, int, list[str]] | None:
        """(file, line, dependencies): its own `depends on` and every enclosing `if`."""
        pattern = re.compile(rf"^\s*(?:menu)?config\s+{re.escape(symbol)}\s*$")
        for rel, lines in self.files.items():
            for number, line in enumerate(lines):
                if pattern.match(line):
                    return rel, number + 1, _depends(lines[number + 1:]) + self.enclosing(rel, number)
        return None

    def enclosing(self, rel: str, number: int, seen: frozenset = frozenset()) -> list[str]:
        """Conditions of the `if` blocks around line ``number`` of ``rel``, up the sources."""
        stack: list[str] = []
        for line in self.files.get(rel, [])[:number]:
            if line[:1].isspace():
                continue  # help text and attributes are indented; if/endif are not
            if line.startswith("if "):
                stack.append(line[3:].split("#")[0].strip())
            elif line.split("#")[0].strip() == "endif" and stack:
                stack.pop()
        parent = self.sourced_from.get(rel)
        if parent and parent[0] not in seen:
            stack += self.enclosing(parent[0], parent[1], seen | {rel})
        return stack


def kconfig_entry(tree: str | Path, symbol: str) -> tuple[str, list[str]] | None:
    """(file:line, what it depends on) of ``config SYMBOL`` in the tree."""
    found = KconfigTree(tree).entry(symbol)
    return None if found is None else (f"{found[0]}:{found[1]}", found[2])


def _depends(lines: list[str]) -> list[str]:
    depends = []
    joined: list[str] = []
    for line in lines:  # a line ending in a backslash goes on on the next one
        if joined and joined[-1].endswith("\\"):
            joined[-1] = joined[-1][:-1].rstrip() + " " + line.strip()
        else:
            joined.append(line)
    for line in joined:
        stripped = line.strip()
        if stripped and not line[:1].isspace():
            break  # the next entry (or if/endif/source) starts at column 0
        if stripped.startswith("depends on "):
            depends.append(stripped[len("depends on "):].split("#")[0].strip())
        if stripped.startswith("help") or stripped == "---help---":
            break
    return depends


def unmet(depends: list[str], config: dict[str, str]) -> list[str]:
    """The `depends on` terms that plainly fail under ``config`` (complex ones kept as is)."""
    failing = []
    for expression in depends:
        for term in (t.strip() for t in expression.split("&&")):
            match = _SIMPLE_DEP.fullmatch(term)
            if not match:
                failing.append(term)  # an expression we do not evaluate: show it
                continue
            negated, name = match.groups()
            enabled = config.get(name, "n") in ("y", "m")
            if enabled == bool(negated):
                failing.append(term)
    return failing


def _on(config: dict[str, str], symbol: str) -> bool:
    return config.get(symbol, "n") in ("y", "m")


def _selectors_on(kconfig_tree: KconfigTree, config: dict[str, str], symbol: str) -> list[str]:
    """The symbols that are on and select ``symbol``."""
    return [name for name in kconfig_tree.selectors(symbol) if _on(config, name)]


def _term(kconfig_tree: KconfigTree, config: dict[str, str], term: str) -> str:
    """An unmet term, with what selects X for a `!X` (6.12: !KEXEC_CORE, selected by
    KEXEC): disabling X itself does nothing, what selects it must be disabled."""
    match = _SIMPLE_DEP.fullmatch(term)
    selectors = _selectors_on(kconfig_tree, config, match.group(2)) if match and match.group(1) else []
    return f"{term} (selected by {', '.join(selectors)})" if selectors else term


def describe(tree: str | Path, config: dict[str, str], found: list[Mismatch]) -> str:
    parts = []
    kconfig_tree = KconfigTree(tree)
    for mismatch in found:
        text = f"{mismatch.symbol} (asked {mismatch.wanted}, got {mismatch.got}"
        entry = kconfig_tree.entry(mismatch.symbol)
        if entry is None:
            text += "; no Kconfig entry defines it in this tree"
        else:
            failing = unmet(entry[2], config) if mismatch.wanted != "n" else []
            if failing:
                text += f"; unmet: {', '.join(_term(kconfig_tree, config, term) for term in failing)}"
            selectors = _selectors_on(kconfig_tree, config, mismatch.symbol) if mismatch.wanted == "n" else []
            if selectors:
                text += f"; selected by {', '.join(selectors)}"
            text += f"; see {entry[0]}:{entry[1]}"
        parts.append(text + ")")
    return "; ".join(parts)


def verify(tree: str | Path, config_file: str | Path, enable=(), module=(), disable=()) -> dict[str, str]:
    """Raise naming every requested symbol Kconfig did not keep; else its values."""
    config = read_config(config_file)
    found = mismatches(config, enable, module, disable)
    if found:
        raise KconfigDroppedError(
            f"Kconfig did not keep {len(found)} requested symbol(s): "
            f"{describe(tree, config, found)}; set the unmet symbols in kernel.config in the "
            "manifest (enable the missing ones; for a `!X` disable X, or what selects it), "
            "or drop the request",
            found,
        )
    return {name: config.get(name, "n") for name in (*enable, *module, *disable)}


class KconfigDroppedError(BuildFailedError):
    def __init__(self, message: str, found: list[Mismatch]):
        super().__init__(message)
        self.mismatches = found
