"""libvirt: reachable, its version, TDX in its domain capabilities, and the dialect.

Dialects (reference/tdx-stack.md): *native* when libvirt >= 11.6 and its domain
capabilities report TDX; *canonical* when an older (Canonical-patched) libvirt reports
TDX; *qemu-args* when libvirt has no TDX XML but the QEMU it drives has tdx-guest.
"""

from __future__ import annotations

from ..domain.policy import LIBVIRT_HOSTDEV_IOMMUFD
from ..errors import HostNotReadyError
from ..host.commands import NOT_RUN
from ..virt.dialect import KVM_INTEL_TDX as KVM_TDX
from ..virt.dialect import LIBVIRT_NATIVE_TDX, LibvirtFacts, choose, version_text
from .check import FAIL, OK, SKIP, WARN, Check
from .context import Context
from .qemu import TDX_OBJECT

# Before 11.10 libvirt could report TDX on hosts without it.
LIBVIRT_TRUSTED_TDX_CAPS = 11_010_000


def dialect(ctx: Context) -> str | None:
    """The dialect `define` would pick (tdxvirt.virt.dialect.choose, the one place that
    decides), else qemu-args when this libvirt lacks TDX XML but its QEMU has
    tdx-guest (define uses it when told --dialect qemu-args), else None."""
    version = ctx.libvirt_version
    if version is None:
        return None
    facts = LibvirtFacts(version, ctx.driver or "",
                         None if ctx.test_driver else bool(ctx.domcaps_tdx()), ctx.uri or "")
    try:
        return choose(None, facts, host_tdx=None)  # KVM's TDX state has checks of its own
    except HostNotReadyError:
        pass
    objects, _ = ctx.qemu_objects if not ctx.remote else (None, None)
    if version < LIBVIRT_NATIVE_TDX and objects and TDX_OBJECT in objects:
        return "qemu-args"
    return None


def _caps(ctx: Context) -> Check:
    name = "libvirt: domain capabilities"
    if ctx.test_driver:
        return Check(name, SKIP, "libvirt's test driver probes no hypervisor (simulated host)")
    tdx = ctx.domcaps_tdx()
    if ctx.domcaps is None:
        return Check(name, FAIL, "libvirt gave no domain capabilities for x86_64 q35",
                     "check that libvirt's QEMU driver and QEMU are installed")
    if tdx:
        kvm = None if ctx.remote else ctx.root.read_value(KVM_TDX)
        if (kvm is not None and kvm != "Y"
                and (ctx.libvirt_version or 0) < LIBVIRT_TRUSTED_TDX_CAPS):
            return Check(name, WARN, f"report TDX, but {KVM_TDX} = {kvm} (libvirt < 11.10 "
                         "may report TDX wrongly)", "`tdxvirt host setup`, reboot")
        return Check(name, OK, "report TDX (features/tdx supported='yes')")
    if tdx is None:
        return Check(name, FAIL, "say nothing of TDX: this libvirt predates TDX (< 11.6)",
                     "libvirt >= 11.6 for the native dialect")
    return Check(name, FAIL, "report <tdx supported='no'/>: libvirt found no TDX in KVM/QEMU",
                 "fix the checks above (BIOS, kvm_intel tdx=Y, QEMU tdx-guest), then restart "
                 "libvirt so it probes again")


def checks(ctx: Context) -> list[Check]:
    conn = ctx.conn
    if conn is None:
        from ..virt.conn import BINDINGS_MISSING

        missing = ctx.conn_error == BINDINGS_MISSING  # the error names its own remedy
        return [Check("libvirt: connection", FAIL,
                      "libvirt's Python bindings are not installed" if missing
                      else ctx.conn_error or "not reachable",
                      "install python3-libvirt (Debian/Ubuntu) or libvirt-python (pip)" if missing
                      else "start libvirtd or virtqemud, or give the right URI with -c")]
    version = ctx.libvirt_version
    result = [Check("libvirt: connection", OK, f"{ctx.uri or 'default URI'} ({ctx.driver} driver)")]
    if version >= LIBVIRT_HOSTDEV_IOMMUFD:
        result.append(Check("libvirt: version", OK, f"{version_text(version)} (native TDX, "
                            "iommufd hostdevs)"))
    elif version >= LIBVIRT_NATIVE_TDX:
        result.append(Check("libvirt: version", OK, f"{version_text(version)} (native TDX; "
                            "legacy VFIO for hostdevs, iommufd from 12.1)"))
    else:
        result.append(Check("libvirt: version", WARN, f"{version_text(version)} < 11.6: no "
                            "TDX XML", "libvirt >= 11.6 (Debian forky, or backports)"))
    result.append(_caps(ctx))
    chosen = dialect(ctx)
    if chosen == "native":
        result.append(Check("libvirt: dialect", OK, "native (<launchSecurity type='tdx'>)"))
    elif chosen == "canonical":
        result.append(Check("libvirt: dialect", OK, "canonical (Canonical's patched libvirt: "
                            "<launchSecurity type='tdx'>, quote service as SocketAddress)"))
    elif chosen == "qemu-args":
        result.append(Check("libvirt: dialect", WARN, "qemu-args: this libvirt has no TDX XML, "
                            "its QEMU has tdx-guest", "`tdxvirt define --dialect qemu-args`, or "
                            "libvirt >= 11.6 for the native dialect"))
    elif (version < LIBVIRT_NATIVE_TDX and not ctx.remote and not ctx.runs_programs
          and ctx.emulator is not None):
        result.append(Check("libvirt: dialect", SKIP, "this libvirt has no TDX XML, and "
                            f"whether its QEMU has tdx-guest is unknown: {NOT_RUN}",
                            "run `tdxvirt host check` on that system itself"))
    else:
        result.append(Check("libvirt: dialect", FAIL, "none: neither libvirt nor QEMU can "
                            "start a TD on this host", "fix the failures above"))
    return result
