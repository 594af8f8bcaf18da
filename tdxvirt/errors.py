"""The exceptions tdxvirt raises.

The library raises these; only the CLI turns them into one-line messages and exit
codes. Every message says what was wrong and how to fix it, on one line.
"""


class TdxvirtError(Exception):
    """Root of every error tdxvirt reports to a user."""

    exit_code = 1


class InputError(TdxvirtError):
    """The user gave a value tdxvirt cannot use (exit 2, like a usage error)."""

    exit_code = 2


class NotFoundError(TdxvirtError):
    """A named domain, device or file does not exist."""

    exit_code = 2


class HostNotReadyError(TdxvirtError):
    """The host (or its libvirt) lacks something a TD needs."""


class LibvirtUnavailableError(TdxvirtError):
    """libvirt could not be reached at the given URI."""


class LibvirtOperationError(TdxvirtError):
    """libvirt refused or failed an operation."""


class DeviceBusyError(TdxvirtError):
    """A device is in use by something else."""


class SimulatorError(TdxvirtError):
    """The simulated host is missing or could not be started."""
