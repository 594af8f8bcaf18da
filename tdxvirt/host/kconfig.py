"""The running kernel's build configuration.

Found as distributions install it, ``/boot/config-$(uname -r)``, else the kernel's own
``/proc/config.gz`` (CONFIG_IKCONFIG_PROC). The release comes from the host root's
``/proc/sys/kernel/osrelease`` so a fake root describes its own kernel.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass

from ..kconfig import NOT_SET, parse_kernel_config
from .root import HostRoot


@dataclass(frozen=True)
class KernelConfig:
    source: str  # the host path it was read from
    release: str | None
    values: dict[str, str]  # symbol without CONFIG_ -> y, m, "string", number

    def enabled(self, symbol: str) -> bool:
        return self.values.get(symbol) in ("y", "m")

    def value(self, symbol: str) -> str | None:
        return self.values.get(symbol)


def parse_config(text: str) -> dict[str, str]:
    """Symbols that are set; ``# CONFIG_X is not set`` and absent symbols are left out."""
    return {k: v for k, v in parse_kernel_config(text).values.items() if v != NOT_SET}


def kernel_release(root: HostRoot) -> str | None:
    return root.read_value("/proc/sys/kernel/osrelease")


def read_kernel_config(root: HostRoot) -> KernelConfig | None:
    """The running kernel's config, or None when neither file is there or readable."""
    release = kernel_release(root)
    if release:
        boot = f"/boot/config-{release}"
        try:
            return KernelConfig(boot, release, parse_config(root.read_text(boot)))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            pass
    try:
        data = root.path("/proc/config.gz").read_bytes()
        text = gzip.decompress(data).decode("utf-8", "replace")
    except (OSError, EOFError):
        return None
    return KernelConfig("/proc/config.gz", release, parse_config(text))
