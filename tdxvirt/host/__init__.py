"""Read-only host facts, always read through a :class:`HostRoot`."""

from .root import HostRoot

__all__ = ["HostRoot"]
