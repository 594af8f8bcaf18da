"""Reading a Linux kernel config file (``/boot/config-*``, ``.config``).

The format is Kconfig's own (scripts/kconfig/confdata.c): ``CONFIG_X=y``, ``=m``, a
number, a quoted string, or the comment ``# CONFIG_X is not set``. Any other line is
ignored, as Kconfig itself does. A gzip-compressed config (a running kernel's
``/proc/config.gz``) is read as well.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .userfile import read_user_file

_ASSIGNMENT = re.compile(r"^CONFIG_([A-Za-z0-9_]+)=(.*)$")
_NOT_SET = re.compile(r"^# CONFIG_([A-Za-z0-9_]+) is not set\s*$")
# The first comment lines of a generated config, e.g. "# Linux/x86 6.12.117 Kernel Configuration".
_HEADER = re.compile(r"^# Linux/(\S+) (\S+) Kernel Configuration\s*$")

BUILTIN = "y"
MODULE = "m"
NOT_SET = "n"


@dataclass(frozen=True)
class KernelConfig:
    """Symbol (without ``CONFIG_``) -> value: "y", "m", "n" (``is not set``) or the raw text."""

    values: dict[str, str]
    arch: str | None = None
    version: str | None = None
    source: str | None = None

    def state(self, symbol: str) -> str | None:
        """"y", "m", "n", another value, or None when the file does not mention the symbol."""
        return self.values.get(symbol)


def _unquote(raw: str) -> str:
    """A Kconfig string value: quoted, with backslash escaping only ``"`` and ``\\``."""
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        return re.sub(r"\\(.)", r"\1", raw[1:-1])
    return raw


def parse_kernel_config(text: str, source: str | None = None) -> KernelConfig:
    values: dict[str, str] = {}
    arch = version = None
    for line in text.splitlines():
        line = line.rstrip("\r")
        if match := _ASSIGNMENT.match(line):
            values[match.group(1)] = _unquote(match.group(2).strip())
        elif match := _NOT_SET.match(line):
            values[match.group(1)] = NOT_SET
        elif arch is None and (match := _HEADER.match(line)):
            arch, version = match.group(1), match.group(2)
    return KernelConfig(values=values, arch=arch, version=version, source=source)


def load_kernel_config(path: str | Path) -> KernelConfig:
    """Read a config file; refuse a file that holds no CONFIG_ line at all."""
    path = Path(path)
    raw = read_user_file(path, "kernel config", "pass a /boot/config-* file")
    if raw[:2] == b"\x1f\x8b":  # /proc/config.gz
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError):
            raise InputError(f"{path} looks gzip-compressed but does not decompress; "
                             "pass an intact kernel config") from None
    # Configs are ASCII in practice; string values may carry other bytes, which must not stop the check.
    config = parse_kernel_config(raw.decode("utf-8", errors="replace"), source=str(path))
    if not config.values:
        raise InputError(
            f"{path} is not a kernel config (no CONFIG_ lines); pass a /boot/config-* file "
            "or a kernel build's .config"
        )
    return config
