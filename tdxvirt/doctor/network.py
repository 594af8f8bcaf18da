"""Guest networking: what `define`'s default NIC (libvirt's 'default' network) and
`--network user` (passt) need on the host. A warning, not a failure: a TD without a
NIC runs, and bridges or other networks may be what this host uses."""

from __future__ import annotations

from .check import OK, SKIP, WARN, Check
from .context import Context

NETWORK = "libvirt network 'default'"
PASST = "passt (--network user)"


def checks(ctx: Context) -> list[Check]:
    from ..virt.networks import DEFAULT_MISSING, network_state

    rows = []
    if ctx.conn is None:
        rows.append(Check(NETWORK, SKIP, "libvirt is not reachable", "see the libvirt check"))
    elif ctx.test_driver:
        rows.append(Check(NETWORK, SKIP, "libvirt's test driver runs no network"))
    else:
        from ..errors import TdxvirtError

        try:
            state = network_state(ctx.conn, "default")
        except TdxvirtError as error:
            state, lost = None, str(error)
        else:
            lost = ""
        if state == "active":
            rows.append(Check(NETWORK, OK, "active: define gives TDs a NIC on it by default"))
        elif state == "inactive":
            rows.append(Check(NETWORK, WARN, "defined but not active: TDs with a NIC on it "
                              "do not start", "`virsh net-start default` and `virsh "
                              "net-autostart default`"))
        else:
            why = lost or ("libvirt has no network driver there" if state is None
                           else "not defined")
            rows.append(Check(NETWORK, WARN, f"{why}: define gives TDs no NIC unless "
                              "--network names one", DEFAULT_MISSING))
    if ctx.remote:
        rows.append(Check(PASST, SKIP, f"remote host ({ctx.uri}): libvirt does not say",
                          "run `tdxvirt host check` on that host for this check"))
    elif any(ctx.root.exists(f"{d}/passt") for d in ("/usr/bin", "/usr/sbin", "/bin", "/sbin")):
        rows.append(Check(PASST, OK, "installed"))
    else:
        rows.append(Check(PASST, WARN, "not installed: TDs defined with --network user do "
                          "not start", "install passt (Debian: passt)"))
    return rows
