"""Module options in modprobe.d: reading what is configured, and tdxvirt's own file.

modprobe reads ``*.conf`` from /lib, /usr/lib, /run and /etc's ``modprobe.d``; a file
in /etc hides one of the same name elsewhere, and all files are read in the order of
their names, later options winning. Module names treat ``-`` and ``_`` alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..host.root import HostRoot

DIRS = ("/lib/modprobe.d", "/usr/lib/modprobe.d", "/run/modprobe.d", "/etc/modprobe.d")
FILE = "/etc/modprobe.d/tdxvirt.conf"
TDX_OPTION = ("kvm_intel", "tdx", "on")
# Canonical raises the legacy VFIO DMA mapping limit for big TDs (the default 65535
# runs out with large guests and GPUs); iommufd has no such limit.
DMA_ENTRY_LIMIT = 0x200000
DMA_OPTION = ("vfio_iommu_type1", "dma_entry_limit", str(DMA_ENTRY_LIMIT))
TRUE_VALUES = {"y", "Y", "1", "on", "yes"}


@dataclass(frozen=True)
class ModuleOption:
    file: str
    module: str
    name: str
    value: str


def _norm(module: str) -> str:
    return module.replace("-", "_")


def parse_options(text: str, file: str) -> list[ModuleOption]:
    """``options MODULE a=b c`` lines (with backslash continuations)."""
    options = []
    logical = text.replace("\\\n", " ")
    for raw in logical.splitlines():
        words = raw.split("#", 1)[0].split()
        if len(words) < 3 or words[0] != "options":
            continue
        for word in words[2:]:
            name, _, value = word.partition("=")
            options.append(ModuleOption(file, _norm(words[1]), name, value))
    return options


def config_files(root: HostRoot) -> list[str]:
    by_name: dict[str, str] = {}
    for directory in DIRS:  # later directories hide earlier ones of the same name
        for name in root.listdir(directory):
            if name.endswith(".conf"):
                by_name[name] = f"{directory}/{name}"
    return [by_name[name] for name in sorted(by_name)]


def configured_options(root: HostRoot, module: str, name: str) -> list[ModuleOption]:
    """Every setting of ``module``'s parameter ``name``, in the order modprobe applies them."""
    found = []
    for path in config_files(root):
        try:
            text = root.read_text(path)
        except OSError:
            continue
        found += [o for o in parse_options(text, path)
                  if o.module == _norm(module) and o.name == name]
    return found


# Host drivers that would take a TD's NVIDIA GPU: nouveau any GPU not on vfio-pci,
# nova_core (Ubuntu 25.10/26.04 kernels) a Blackwell GPU again after the reset that
# applies its CC mode. `nvidia` is not blacklisted: a host may use it for other GPUs.
GPU_BLACKLIST = ("nouveau", "nova_core")


def parse_blacklist(text: str) -> set[str]:
    """Modules the ``blacklist MODULE`` lines of one modprobe.d file name."""
    found = set()
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if len(words) == 2 and words[0] == "blacklist":
            found.add(_norm(words[1]))
    return found


def blacklisted(root: HostRoot) -> set[str]:
    """Modules a ``blacklist MODULE`` line of any modprobe.d file names."""
    found = set()
    for path in config_files(root):
        try:
            found |= parse_blacklist(root.read_text(path))
        except OSError:
            continue
    return found


def render(legacy_vfio: bool, blacklist: tuple[str, ...] = (), tdx: bool = True) -> str:
    """tdxvirt's file; ``tdx``: False when another file already loads kvm_intel with TDX."""
    lines = ["# Written by `tdxvirt host setup`; `tdxvirt host setup --revert` removes it."]
    if tdx:
        lines += ["# KVM runs TDX trust domains only with this option (read when kvm_intel loads).",
                  "options {} {}={}".format(*TDX_OPTION)]
    if blacklist:
        lines += ["# Host drivers that would take the TDs' NVIDIA GPUs (nova_core: after the",
                  "# reset that applies a GPU's CC mode)."]
        lines += [f"blacklist {module}" for module in blacklist]
    if legacy_vfio:
        lines += [
            "# Legacy VFIO: enough DMA mappings for large TDs with GPUs (Canonical's value).",
            "options {} {}={}".format(*DMA_OPTION),
        ]
    return "\n".join(lines) + "\n"
