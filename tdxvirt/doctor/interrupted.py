"""Defines and undefines killed midway on this machine (tdxvirt.lifecycle.journal): named
until `tdxvirt recover` or the next define/undefine finishes or undoes them."""

from __future__ import annotations

from .check import OK, WARN, Check
from .context import Context

NAME = "interrupted changes"


def checks(ctx: Context) -> list[Check]:
    if skipped := ctx.skip_if_remote(NAME):
        return [skipped]
    from ..lifecycle import journal

    waiting = journal.pending()
    if not waiting:
        return [Check(NAME, OK, "none")]
    found = "; ".join(f"{intent.op} of {intent.name!r}" for _, intent in waiting)
    return [Check(NAME, WARN, f"{found}: killed midway (or still running)",
                  "`tdxvirt recover` finishes or undoes them (so does the next define or undefine)")]
