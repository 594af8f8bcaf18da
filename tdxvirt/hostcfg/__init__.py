"""Changing the host safely: file editors, planned steps, atomic writes, backups.

Every change is planned as steps by pure functions (``setup``), shown as unified diffs
and argv lists, then applied atomically with backups (``apply``) and revertible.
"""
