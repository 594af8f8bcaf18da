"""cloud-init user-data for a TD's first boot: checked inputs, and the template in domains/.

user-data is YAML, not XML: the template is rendered with autoescape off, and every
``{{ }}`` value goes through ``yaml_quote`` (jinja2's ``finalize``), so no value can
end a string, start a new key or smuggle in a line.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..errors import InputError
from ..userfile import read_user_file

TEMPLATE = "user-data.j2"
DEFAULT_USER = "tdx"

# Debian's adduser NAME_REGEX, and the length useradd allows.
_USER = re.compile(r"^[a-z][-a-z0-9_]{0,31}$")
_HOST_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ssh-dss",
    "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
})
# First lines cloud-init acts on (cloudinit/handlers, user_data.py); anything else it ignores.
# The most tdxvirt reads of a --user-data or --ssh-key file (userfile.read_user_file).
USER_DATA_LIMIT = 1024 * 1024
SSH_KEY_FILE_LIMIT = 1024 * 1024
USER_DATA_HEADERS = (
    "#cloud-config", "#!", "#include", "#cloud-boothook", "#part-handler",
    "## template: jinja", "Content-Type:", "MIME-Version:",
)


def yaml_quote(value) -> str:
    """A YAML double-quoted scalar that reads back as exactly ``value``.

    Printable ASCII stays as is; everything else is a YAML escape (\\xXX, \\uXXXX,
    \\UXXXXXXXX), so line breaks, tabs, quotes and non-printable characters cannot change
    the document's structure. Only strings are accepted: a template must not print
    anything else unquoted.
    """
    if not isinstance(value, str):
        raise TypeError(f"user-data templates print only strings, not {type(value).__name__}")
    out = ['"']
    for char in value:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= code <= 0x7E:
            out.append(char)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def check_user(user: str) -> str:
    if user == "root" or not _USER.fullmatch(user or ""):
        raise InputError(
            f"user name {user!r} cannot be created by cloud-init; use 1 to 32 lower-case letters, "
            "digits, '-' or '_', starting with a letter (not root)"
        )
    return user


def check_hostname(hostname: str) -> str:
    labels = (hostname or "").split(".")
    if len(hostname or "") > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise InputError(
            f"host name {hostname!r} is not a valid DNS name; use lower-case letters, digits and "
            "'-' (at most 63 per dot-separated label, not starting or ending with '-')"
        )
    return hostname


def hostname_for(name: str) -> str:
    """A guest host name derived from a domain name (which may hold '_', '+', '.', upper case)."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return label or "td"


def _key_line_type(line: str) -> str | None:
    """The key type of one authorized_keys line whose base64 blob names that same type."""
    fields = line.split()
    for index, field in enumerate(fields[:-1]):
        if field not in KEY_TYPES:
            continue
        try:
            blob = base64.b64decode(fields[index + 1], validate=True)
        except (binascii.Error, ValueError):
            return None
        if len(blob) < 4:
            return None
        (length,) = struct.unpack(">I", blob[:4])
        return field if blob[4:4 + length] == field.encode() else None
    return None


def parse_ssh_public_keys(text: str, source: str = "ssh key") -> list[str]:
    """The keys of a ``.pub`` or ``authorized_keys`` file, one per line; comments dropped."""
    if "PRIVATE KEY" in text or text.lstrip().startswith("-----BEGIN"):
        raise InputError(
            f"{source} is a private key; pass the public key (the .pub file beside it)"
        )
    keys = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if _key_line_type(line) is None:
            raise InputError(
                f"{source} line {number} is not an OpenSSH public key (expected e.g. "
                "'ssh-ed25519 AAAA... comment'); pass a .pub or authorized_keys file"
            )
        keys.append(line)
    if not keys:
        raise InputError(f"{source} holds no public key; pass a .pub or authorized_keys file")
    return keys


def _read_text(path: Path, what: str, limit: int) -> str:
    """The file as text; errors name the file, never its content (tdxvirt often runs
    as root, and the file may be one only root can read)."""
    try:
        return read_user_file(path, what, "pass a regular file", limit=limit).decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{what} {path} is not UTF-8 text") from None


def read_ssh_key_file(path: str | Path) -> list[str]:
    path = Path(path)
    return parse_ssh_public_keys(_read_text(path, "ssh key file", SSH_KEY_FILE_LIMIT),
                                 source=f"ssh key file {path}")


def check_user_data(text: str, source: str = "user-data") -> str:
    """A user's own user-data, refused when cloud-init would silently ignore it."""
    first = text.lstrip("\ufeff").split("\n", 1)[0].rstrip("\r")
    if not first.startswith(USER_DATA_HEADERS):
        # The content is never quoted: the file may be one only root can read.
        raise InputError(
            f"{source} does not start with '#cloud-config'; cloud-init ignores user-data whose "
            "first line is not '#cloud-config' (or '#!', '#include', a MIME header): add "
            "'#cloud-config' as line 1"
        )
    return text


def read_user_data_file(path: str | Path) -> str:
    path = Path(path)
    return check_user_data(_read_text(path, "user-data file", USER_DATA_LIMIT),
                           source=f"user-data file {path}")


def _load(name: str) -> str:
    return resources.files("tdxvirt.domains").joinpath(name).read_text()


@lru_cache(maxsize=1)
def _environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FunctionLoader(_load),
        autoescape=False,  # YAML, not XML: safety comes from finalize=yaml_quote
        finalize=yaml_quote,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def render_user_data(*, hostname: str, user: str = DEFAULT_USER, ssh_keys=(),
                     template: str = TEMPLATE, imex_channel: bool = False) -> str:
    """tdxvirt's default user-data (domains/user-data.j2) for this guest."""
    keys = list(ssh_keys)
    for number, key in enumerate(keys, start=1):  # one valid key per entry, whatever the caller passed
        if not isinstance(key, str) or parse_ssh_public_keys(key, f"ssh key {number}") != [key.strip()]:
            raise InputError(f"ssh key {number} must be one public key on one line")
    return _environment().get_template(template).render(
        hostname=check_hostname(hostname), user=check_user(user),
        ssh_keys=[key.strip() for key in keys], imex_channel=bool(imex_channel)
    )
