"""What the user asked for: a TD spec, validated field by field.

A TDSpec holds intent only (parsed and checked user input). Decisions that depend on
the host (firmware path, MMIO window, alignment) are made in :mod:`tdxvirt.policy`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import InputError
from .pci import PciAddress
from .units import MIB, parse_size

# Stricter than libvirt (which only forbids '/'): a name users can type in a shell,
# that is safe in file names and needs no quoting in virsh.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")

DEFAULT_VCPUS = 4
DEFAULT_MEMORY = "16G"
MAX_VCPUS = 1024
# bit 28: SEPT #VE disable, the default every TDX stack uses; bit 0: debug.
DEFAULT_POLICY = 0x10000000


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InputError(
            f"invalid TD name {name!r}: use 1 to 64 letters, digits, '.', '_', '+' "
            "or '-', starting with a letter or digit"
        )
    return name


def default_name(gpus: tuple[PciAddress, ...]) -> str:
    """A readable name from the first GPU: ``td-38-00-0`` (``-x2`` for two GPUs)."""
    if not gpus:
        return "td"
    first = gpus[0].short.replace(":", "-").replace(".", "-")
    return f"td-{first}" if len(gpus) == 1 else f"td-{first}-x{len(gpus)}"


def parse_gpus(values: tuple[str, ...] | list[str]) -> tuple[PciAddress, ...]:
    gpus = tuple(PciAddress.parse(v) for v in values)
    seen: set[PciAddress] = set()
    for gpu in gpus:
        if gpu in seen:
            raise InputError(f"GPU {gpu} is given twice; pass each --gpu once")
        seen.add(gpu)
    return gpus


def validate_vcpus(vcpus: int) -> int:
    if isinstance(vcpus, bool) or not isinstance(vcpus, int) or not 1 <= vcpus <= MAX_VCPUS:
        raise InputError(f"invalid --vcpus {vcpus!r}: use a whole number from 1 to {MAX_VCPUS}")
    return vcpus


def validate_existing_file(path: str, option: str) -> str:
    """An absolute path to an existing regular file (libvirt needs absolute paths)."""
    absolute = os.path.abspath(path)
    if not os.path.isfile(absolute):
        raise InputError(f"{option} {path!r}: no such file; give the path of an existing file")
    return absolute


@dataclass(frozen=True)
class TDSpec:
    name: str
    gpus: tuple[PciAddress, ...]
    vcpus: int = DEFAULT_VCPUS
    memory: int = 16 * 1024 * MIB  # bytes
    image: str | None = None
    ovmf: str | None = None  # None: find it from the host's firmware descriptors
    policy: int = DEFAULT_POLICY
    managed: bool = True

    @classmethod
    def from_user(
        cls,
        *,
        name: str | None,
        gpus: tuple[str, ...] | list[str],
        vcpus: int = DEFAULT_VCPUS,
        memory: str = DEFAULT_MEMORY,
        image: str | None = None,
        ovmf: str | None = None,
    ) -> "TDSpec":
        """Parse and check everything the user typed; raise InputError naming the field."""
        addresses = parse_gpus(gpus)
        return cls(
            name=validate_name(name if name is not None else default_name(addresses)),
            gpus=addresses,
            vcpus=validate_vcpus(vcpus),
            memory=parse_size(memory, "--memory"),
            image=None if image is None else validate_existing_file(image, "--image"),
            ovmf=None if ovmf is None else validate_existing_file(ovmf, "--ovmf"),
        )
