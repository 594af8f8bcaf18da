"""tdxvirt's libvirt hook: installed and current, so every start of a TD is checked
inside libvirt (virsh, virt-manager, autostart, restore, snapshot revert)."""

from __future__ import annotations

import os

from ..enforce.script import HOOK
from ..hostcfg.files import read_bytes
from .check import FAIL, OK, WARN, Check
from .context import Context

NAME = "libvirt hook"
SETUP = "`tdxvirt host setup`"


def checks(ctx: Context) -> list[Check]:
    if skipped := ctx.skip_if_remote(NAME):
        return [skipped]
    from ..hostcfg.setup import hook_script

    path = ctx.root.path(HOOK)
    data = read_bytes(path)
    if data is None:
        return [Check(NAME, FAIL, f"{HOOK} is not installed: virsh, virt-manager and autostart "
                      "start TDs without tdxvirt's checks", SETUP)]
    if data != hook_script(ctx.root.hook_install):
        return [Check(NAME, WARN, f"{HOOK} is not the one this tdxvirt installs (another "
                      "version, Python or state directory)", SETUP)]
    if not os.access(path, os.X_OK):
        return [Check(NAME, FAIL, f"{HOOK} is not executable: libvirt skips it", SETUP)]
    return [Check(NAME, OK, f"{HOOK}, current")]
