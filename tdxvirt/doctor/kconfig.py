"""The running kernel's configuration against what a TDX host with GPU passthrough needs.

The lists are the source document's plus Intel's wiki (see reference/tdx-stack.md).
Without the first group no TD with a GPU starts. The source document also enables
TDX_GUEST_DRIVER and HYPERV, which a host does not use, and disables KEXEC and
CRASH_DUMP, which its pre-release kernel could not combine with TDX: those are warnings.
"""

from __future__ import annotations

from ..host.kconfig import read_kernel_config
from .check import FAIL, OK, SKIP, WARN, Check
from .context import Context

REQUIRED = ("INTEL_TDX_HOST", "KVM", "KVM_INTEL", "IOMMUFD", "IOMMUFD_DRIVER",
            "VFIO_DEVICE_CDEV")
SOURCE_DOCUMENT_ENABLED = ("TDX_GUEST_DRIVER", "HYPERV")
SOURCE_DOCUMENT_DISABLED = ("KEXEC", "CRASH_DUMP")


def _names(symbols) -> str:
    return ", ".join(f"CONFIG_{s}" for s in symbols)


def checks(ctx: Context) -> list[Check]:
    if skipped := ctx.skip_if_remote("kernel config"):
        return [skipped]
    config = read_kernel_config(ctx.root)
    if config is None:
        return [Check("kernel config", SKIP,
                      "neither /boot/config-$(uname -r) nor /proc/config.gz is readable",
                      "install the kernel's config file to check its symbols")]
    where = config.source
    missing = [s for s in REQUIRED if not config.enabled(s)]
    required = (Check("kernel config: required", FAIL, f"{where}: not set: {_names(missing)}",
                      "build and boot a kernel with these enabled (Linux >= 6.16 for "
                      "INTEL_TDX_HOST with KVM)")
                if missing else
                Check("kernel config: required", OK, f"{where}: {_names(REQUIRED)} set"))
    extra_missing = [s for s in SOURCE_DOCUMENT_ENABLED if not config.enabled(s)]
    extra_set = [s for s in SOURCE_DOCUMENT_DISABLED if config.enabled(s)]
    problems = []
    if extra_missing:
        problems.append(f"not set: {_names(extra_missing)}")
    if extra_set:
        problems.append(f"set: {_names(extra_set)}")
    extras = (Check("kernel config: device-passthrough kernel", WARN, f"{where}: {'; '.join(problems)}",
                    "Intel's 2024 device-passthrough kernel wants "
                    f"{_names(SOURCE_DOCUMENT_ENABLED)} on and {_names(SOURCE_DOCUMENT_DISABLED)} "
                    "off; rebuild if you run that kernel")
              if problems else
              Check("kernel config: device-passthrough kernel", OK,
                    f"{where}: as Intel's 2024 device-passthrough setup asks"))
    return [required, extras]
