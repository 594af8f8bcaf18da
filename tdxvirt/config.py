"""tdxvirt's own settings: a TOML file of defaults that override tdxvirt's built-ins.

Read from ``$TDXVIRT_CONFIG`` alone when set, else ``/etc/tdxvirt/config.toml`` then
``~/.config/tdxvirt/config.toml`` (the user's file wins key by key)::

    [defaults]
    ovmf = "/opt/tdx/OVMF.fd"                 # TDX firmware for define
    qemu = "/usr/local/bin/qemu-system-x86_64" # emulator for define
    overlay_dir = "/var/lib/libvirt/images"   # where --image overlays are created
    pccs_url = "https://pccs.example:8081"    # collateral for `guest attest` (a URL, not a path)

    [hosts]                                   # a fleet (docs/fleet.md): name = libvirt URI
    gpu-a = "qemu+ssh://root@gpu-a.example/system"
    gpu-b = "qemu+ssh://root@gpu-b.example/system"

``-c NAME`` names one of ``[hosts]``; ``--fleet`` names all of them, in the file's order
(the system file's hosts first, then the user's new ones; a name in both takes the
user's URI).

As root (euid 0) a config file chooses what root runs (``qemu``) and where it writes
(``overlay_dir``), so one is read only if root owns it and no group or other user can
change it or a directory above it (``sudo -E`` keeps ``$TDXVIRT_CONFIG`` and the
user's ``$HOME``); anything else is refused with one line saying how to fix it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .host.trust import require_trusted

SYSTEM_CONFIG = Path("/etc/tdxvirt/config.toml")
USER_CONFIG = Path("~/.config/tdxvirt/config.toml")
_KEYS = ("ovmf", "qemu", "overlay_dir", "pccs_url")
_URL_KEYS = ("pccs_url",)
_TABLES = ("defaults", "hosts")
# A host's name is used as a `-c` value and shown in a HOST column: no URI characters.
HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


@dataclass(frozen=True)
class Config:
    ovmf: str | None = None
    qemu: str | None = None
    overlay_dir: str | None = None
    pccs_url: str | None = None
    hosts: tuple[tuple[str, str], ...] = ()  # [hosts]: (name, URI) in the file's order

    def host_uri(self, name: str) -> str | None:
        return dict(self.hosts).get(name)


def _read(path: Path) -> dict:
    import tomllib  # only when a config file exists: most commands read none

    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"config file {path}: {error}; fix the TOML syntax") from None
    except OSError as error:
        raise InputError(f"config file {path}: cannot read it ({error.strerror})") from None
    unknown_tables = set(data) - set(_TABLES)
    if unknown_tables:
        raise InputError(f"config file {path}: unknown table [{sorted(unknown_tables)[0]}]; "
                         "only [defaults] and [hosts] are read")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise InputError(f"config file {path}: 'defaults' must be a table")
    for key, value in defaults.items():
        if key not in _KEYS:
            raise InputError(f"config file {path}: unknown key defaults.{key}; "
                             f"known keys: {', '.join(_KEYS)}")
        if key in _URL_KEYS:
            if not isinstance(value, str) or not value.startswith(("https://", "http://")):
                raise InputError(f"config file {path}: defaults.{key} must be an http(s):// URL string")
        elif not isinstance(value, str) or not value.startswith("/"):
            raise InputError(f"config file {path}: defaults.{key} must be an absolute path string")
    return {**defaults, "hosts": _hosts(path, data.get("hosts", {}))}


def _hosts(path: Path, table) -> dict[str, str]:
    """[hosts]: name = "libvirt URI" (tomllib keeps the file's order)."""
    if not isinstance(table, dict):
        raise InputError(f"config file {path}: 'hosts' must be a table of name = \"URI\"")
    for name, uri in table.items():
        if not HOST_NAME.fullmatch(name):
            raise InputError(f"config file {path}: host name {name!r} in [hosts]: use letters, "
                             "digits, '.', '_' and '-' (at most 63, starting with a letter or digit)")
        if not isinstance(uri, str) or "://" not in uri or any(c.isspace() for c in uri):
            raise InputError(f"config file {path}: hosts.{name} must be a libvirt URI string "
                             "such as \"qemu+ssh://root@gpu-a/system\"")
    return table


def load_config() -> Config:
    explicit = os.environ.get("TDXVIRT_CONFIG")
    if explicit:
        paths = [Path(explicit)]
        if not paths[0].is_file():
            raise InputError(f"TDXVIRT_CONFIG names {explicit}, which does not exist")
    else:
        paths = [p for p in (SYSTEM_CONFIG, USER_CONFIG.expanduser()) if p.is_file()]
    merged: dict = {}
    hosts: dict[str, str] = {}
    for path in paths:
        if explicit:
            require_trusted(path, "config file", otherwise="unset TDXVIRT_CONFIG")
        elif path == SYSTEM_CONFIG:
            require_trusted(path, "config file")
        else:
            require_trusted(path, "config file", otherwise="run sudo without -E (it keeps "
                            "your HOME, and so your own config file)")
        read = _read(path)
        hosts.update(read.pop("hosts"))  # the user's file wins name by name
        merged.update(read)
    return Config(**merged, hosts=tuple(hosts.items()))
