"""A cloud-init NoCloud seed: an ISO 9660 image labelled ``cidata`` holding user-data and meta-data.

Written in Python with pycdlib (no mkisofs/genisoimage needed), laid out as cloud-init's
documentation makes it with ``genisoimage -volid cidata -joliet -rock``: the volume
label is what cloud-init's NoCloud datasource looks for (``blkid -t LABEL=cidata``), and
the Rock Ridge and Joliet names give the files their real names (``user-data``).
No network-config is written: cloud-init's fallback (DHCP on the first NIC) is what a
TD with one virtio NIC needs.

Typical use (``define --cloud-init``)::

    seed = plan_seed(hostname=hostname_for(name), user="tdx", ssh_keys=read_ssh_key_file(pub))
    write_seed_iso(seed, path)          # or build_seed_iso(path, hostname=..., ...)
"""

from __future__ import annotations

import io
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, TdxvirtError
from .userdata import DEFAULT_USER, check_hostname, check_user_data, render_user_data, yaml_quote

VOLUME_LABEL = "cidata"
USER_DATA = "user-data"
META_DATA = "meta-data"
# The mode write_seed_iso gives a seed on its own. `define` never leaves it so: it
# writes the seed in a private directory, makes it 0640 root:<QEMU's group> (tdxvirt.lifecycle.tds
# SEED_MODE, assemble.storage_owner: `host setup` sets dynamic_ownership = 0, so libvirt
# no longer chowns disk files and QEMU reads the seed through its group) and only then
# links it into place, because user-data may hold secrets (issue #18).
SEED_MODE = 0o644


@dataclass(frozen=True)
class Seed:
    """What goes on the seed ISO, decided before anything is written (for --dry-run)."""

    hostname: str
    instance_id: str
    user_data: str
    meta_data: str
    default_user_data: bool  # False: the user's own --user-data replaced tdxvirt's template

    def files(self) -> dict[str, bytes]:
        return {USER_DATA: self.user_data.encode(), META_DATA: self.meta_data.encode()}


def render_meta_data(*, instance_id: str, hostname: str) -> str:
    # cloud-init runs its per-instance modules again whenever instance-id changes.
    return (f"instance-id: {yaml_quote(instance_id)}\n"
            f"local-hostname: {yaml_quote(hostname)}\n")


def plan_seed(*, hostname: str, user: str = DEFAULT_USER, ssh_keys=(), user_data: str | None = None,
              instance_id: str | None = None, imex_channel: bool = False) -> Seed:
    """The seed's contents: tdxvirt's user-data template, or ``user_data`` (replacing it).

    ``instance_id`` defaults to a fresh id, so a redefined TD runs its first boot again;
    pass the domain's UUID to tie the two together.
    """
    check_hostname(hostname)
    instance_id = instance_id or f"{hostname}-{uuid.uuid4()}"
    if not instance_id.strip() or any(ch in instance_id for ch in "\r\n"):
        raise InputError(f"instance id {instance_id!r} must be one non-empty line")
    if user_data is None:
        text, default = render_user_data(hostname=hostname, user=user, ssh_keys=ssh_keys,
                                         imex_channel=imex_channel), True
    elif list(ssh_keys):
        # The user's own user-data replaces tdxvirt's, which is where keys would go.
        raise InputError("ssh keys cannot be added to your own user-data; put them in it "
                         "(users: ... ssh_authorized_keys) or leave out --user-data")
    else:
        text, default = check_user_data(user_data), False
    return Seed(hostname=hostname, instance_id=instance_id, user_data=text,
                meta_data=render_meta_data(instance_id=instance_id, hostname=hostname),
                default_user_data=default)


def _iso9660_name(name: str) -> str:
    # Plain ISO 9660 allows only upper-case letters, digits and '_'; readers use the
    # Rock Ridge / Joliet names, this is only the fallback.
    return "/" + name.upper().replace("-", "_") + ".;1"


def write_seed_iso(seed: Seed, path: str | Path, mode: int = SEED_MODE) -> Path:
    """Write the ISO atomically (a temporary file renamed into place), with ``mode``;
    nothing is left on failure."""
    import pycdlib
    from pycdlib.pycdlibexception import PyCdlibException

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create {path.parent} for the seed ISO: {error.strerror}") from None
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=VOLUME_LABEL)
    for name, data in seed.files().items():
        iso.add_fp(io.BytesIO(data), len(data), _iso9660_name(name), rr_name=name,
                   joliet_path="/" + name, file_mode=0o100444)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            iso.write_fp(out)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except (OSError, PyCdlibException) as error:
        os.unlink(temporary)
        raise TdxvirtError(f"cannot write the cloud-init seed {path}: {error}") from None
    finally:
        iso.close()
    return path


def build_seed_iso(path: str | Path, *, hostname: str, user: str = DEFAULT_USER, ssh_keys=(),
                   user_data: str | None = None, instance_id: str | None = None,
                   imex_channel: bool = False) -> Seed:
    """Plan and write a seed ISO at ``path`` in one step; returns what was written."""
    seed = plan_seed(hostname=hostname, user=user, ssh_keys=ssh_keys, user_data=user_data,
                     instance_id=instance_id, imex_channel=imex_channel)
    write_seed_iso(seed, path)
    return seed


def read_seed_iso(path: str | Path) -> tuple[str, dict[str, bytes]]:
    """(volume label, {Rock Ridge name: content}) of a seed ISO, read back with pycdlib."""
    import pycdlib
    from pycdlib.pycdlibexception import PyCdlibException

    iso = pycdlib.PyCdlib()
    try:
        iso.open(str(path))
    except (OSError, PyCdlibException) as error:
        raise InputError(f"{path} is not a readable ISO image: {error}") from None
    try:
        label = iso.pvd.volume_identifier.decode().rstrip()
        files = {}
        for child in iso.list_children(rr_path="/"):
            if child.is_dir():
                continue
            name = child.rock_ridge.name().decode()
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path="/" + name)
            files[name] = out.getvalue()
        return label, files
    finally:
        iso.close()
