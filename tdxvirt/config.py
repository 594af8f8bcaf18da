"""tdxvirt's own settings: a TOML file of defaults that override tdxvirt's built-ins.

Read from ``$TDXVIRT_CONFIG`` alone when set, else ``/etc/tdxvirt/config.toml`` then
``~/.config/tdxvirt/config.toml`` (the user's file wins key by key)::

    [defaults]
    ovmf = "/opt/tdx/OVMF.fd"                 # TDX firmware for define
    qemu = "/usr/local/bin/qemu-system-x86_64" # emulator for define
    overlay_dir = "/var/lib/libvirt/images"   # where --image overlays are created

As root (euid 0) a config file chooses what root runs (``qemu``) and where it writes
(``overlay_dir``), so one is read only if root owns it and no group or other user can
change it or a directory above it (``sudo -E`` keeps ``$TDXVIRT_CONFIG`` and the
user's ``$HOME``); anything else is refused with one line saying how to fix it.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .host.trust import require_trusted

SYSTEM_CONFIG = Path("/etc/tdxvirt/config.toml")
USER_CONFIG = Path("~/.config/tdxvirt/config.toml")
_KEYS = ("ovmf", "qemu", "overlay_dir")


@dataclass(frozen=True)
class Config:
    ovmf: str | None = None
    qemu: str | None = None
    overlay_dir: str | None = None


def _read(path: Path) -> dict:
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"config file {path}: {error}; fix the TOML syntax") from None
    except OSError as error:
        raise InputError(f"config file {path}: cannot read it ({error.strerror})") from None
    unknown_tables = set(data) - {"defaults"}
    if unknown_tables:
        raise InputError(f"config file {path}: unknown table [{sorted(unknown_tables)[0]}]; "
                         "only [defaults] is read")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise InputError(f"config file {path}: 'defaults' must be a table")
    for key, value in defaults.items():
        if key not in _KEYS:
            raise InputError(f"config file {path}: unknown key defaults.{key}; "
                             f"known keys: {', '.join(_KEYS)}")
        if not isinstance(value, str) or not value.startswith("/"):
            raise InputError(f"config file {path}: defaults.{key} must be an absolute path string")
    return defaults


def load_config() -> Config:
    explicit = os.environ.get("TDXVIRT_CONFIG")
    if explicit:
        paths = [Path(explicit)]
        if not paths[0].is_file():
            raise InputError(f"TDXVIRT_CONFIG names {explicit}, which does not exist")
    else:
        paths = [p for p in (SYSTEM_CONFIG, USER_CONFIG.expanduser()) if p.is_file()]
    merged: dict = {}
    for path in paths:
        if explicit:
            require_trusted(path, "config file", otherwise="unset TDXVIRT_CONFIG")
        elif path == SYSTEM_CONFIG:
            require_trusted(path, "config file")
        else:
            require_trusted(path, "config file", otherwise="run sudo without -E (it keeps "
                            "your HOME, and so your own config file)")
        merged.update(_read(path))
    return Config(**merged)
