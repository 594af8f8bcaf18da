"""The guest side of a TD: its kernel config, its first boot, and checks run inside it."""

from ..errors import TdxvirtError


class GuestNotReadyError(TdxvirtError):
    """The guest (its kernel config, or the running guest) lacks something a TD with a GPU needs."""
