"""qemu.conf: what TDs with passed-through GPUs need, and whether libvirt has read it.

The source document's settings: dynamic_ownership = 0, security_driver = "none",
user and group set. ``--security-driver keep`` (udev rules giving QEMU's group the
VFIO and iommufd nodes) stands in for security_driver = "none".
"""

from __future__ import annotations

import shlex
import time

from ..hostcfg import daemon, udev
from ..hostcfg.files import read_bytes
from ..hostcfg.qemuconf import PATH, QemuConf, QemuConfSyntaxError
from .check import FAIL, OK, SKIP, WARN, Check
from .context import Context

SETUP = "`tdxvirt host setup`"


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _restart(ctx: Context) -> Check:
    name = "qemu.conf: read by libvirt"
    running = daemon.detect(ctx.root)
    if not running.running:
        return Check(name, SKIP, "no libvirtd or virtqemud process on this host")
    started = running.started_at
    changed = ctx.root.path(PATH).stat().st_mtime
    if started is None:
        return Check(name, SKIP, f"{running.name}'s start time is not readable")
    if started >= changed:
        return Check(name, OK, f"{running.name} started {_when(started)}, after qemu.conf "
                     f"changed ({_when(changed)})")
    return Check(name, FAIL, f"qemu.conf changed {_when(changed)}, after {running.name} "
                 f"started ({_when(started)})", _restart_remedy(running))


def _restart_remedy(running: daemon.DaemonInUse) -> str:
    if running.systemd:
        return f"`systemctl restart {running.name}`"
    if running.restart:  # the host root's own way (the simulated host's `tdxvirt sim restart`)
        return f"`{shlex.join(running.restart)}`"
    return daemon.restart_advice(running)


def checks(ctx: Context) -> list[Check]:
    if skipped := ctx.skip_if_remote("qemu.conf"):
        return [skipped]
    data = read_bytes(ctx.root.path(PATH))
    if data is None:
        return [Check("qemu.conf", SKIP, f"no {PATH} (libvirt's QEMU driver not installed here)")]
    try:
        conf = QemuConf.parse(data)
    except QemuConfSyntaxError as error:
        return [Check("qemu.conf", FAIL, str(error).split("; fix")[0], "fix the line by hand")]
    result = []
    ownership = conf.get("dynamic_ownership")
    if ownership == 0:
        result.append(Check("qemu.conf: dynamic_ownership", OK, "0"))
    else:
        shown = "unset (1)" if ownership is None else str(ownership)
        result.append(Check("qemu.conf: dynamic_ownership", FAIL, shown, SETUP))
    driver = conf.get("security_driver")
    rules = read_bytes(ctx.root.path(udev.FILE))
    rules_group = udev.rules_group(rules.decode("utf-8", "replace")) if rules else None
    if driver == "none":
        result.append(Check("qemu.conf: security_driver", OK, '"none" (sVirt confinement off)'))
    elif rules_group:
        shown = "default" if driver is None else repr(driver)
        result.append(Check("qemu.conf: security_driver", OK, f"{shown}, kept; {udev.FILE} "
                            f"gives group {rules_group} the VFIO nodes"))
    else:
        shown = "unset (distribution default)" if driver is None else repr(driver)
        result.append(Check("qemu.conf: security_driver", FAIL, f"{shown} and no VFIO udev "
                            "rules: QEMU may not open /dev/vfio/devices/* and /dev/iommu",
                            f'{SETUP} (security_driver = "none") or '
                            f"{SETUP} --security-driver keep (udev rules)"))
    user, group = conf.get("user"), conf.get("group")
    if user is None or group is None:
        result.append(Check("qemu.conf: user/group", WARN, "not set: libvirt's built-in "
                            "default applies", f"{SETUP} --user U --group G"))
    elif rules_group and driver != "none" and group != rules_group:
        result.append(Check("qemu.conf: user/group", WARN, f"group {group}, but the udev "
                            f"rules give {rules_group} the VFIO nodes", SETUP))
    else:
        result.append(Check("qemu.conf: user/group", OK, f"{user}:{group}"))
    result.append(_restart(ctx))
    return result
