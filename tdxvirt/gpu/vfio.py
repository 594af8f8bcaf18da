"""Moving GPUs (with their IOMMU groups) to vfio-pci and back, all or nothing.

``plan_detach`` / ``plan_reattach`` read the host and refuse the dangerous cases
before anything changes; ``apply`` moves the devices one by one through a binder,
re-reads sysfs after each to check the kernel really did it, and on the first
failure puts every device it already moved (and the failing one) back, reporting
the outcome of each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import DeviceBusyError, TdxvirtError
from ..host import HostRoot
from ..host.pci import PciDevice
from .binding import Binder, DeviceState, StepFailed, read_state
from .busy import host_users, vm_users
from .devices import kind_of, model
from .groups import VFIO_DRIVER, VFIO_SAFE_DRIVERS, Member, describe_class, read_group, read_member, require_movable

DETACH = "detach"
REATTACH = "reattach"


@dataclass(frozen=True)
class Move:
    """One device to move, or to leave because it already is where it should be."""

    member: Member
    state: DeviceState
    reason: str  # "requested", or why it comes along ("IOMMU group 42 of 0000:38:00.0")
    noop: str | None = None  # set when nothing needs doing, saying why

    @property
    def address(self) -> str:
        return str(self.state.address)

    @property
    def label(self) -> str:
        if kind_of(self.member.device) is not None:
            return model(self.member.device)
        device = self.member.device
        return f"{describe_class(device.pci_class)} {device.vendor:04x}:{device.device:04x}"


@dataclass(frozen=True)
class Plan:
    action: str  # DETACH or REATTACH
    moves: tuple[Move, ...]

    @property
    def to_vfio(self) -> bool:
        return self.action == DETACH


@dataclass(frozen=True)
class Outcome:
    address: str
    label: str
    before: str | None  # driver before
    after: str | None  # driver now
    result: str
    ok: bool


class BindingError(TdxvirtError):
    """A move failed; ``outcomes`` says what happened to every device."""

    def __init__(self, message: str, outcomes: list[Outcome]):
        super().__init__(message)
        self.outcomes = outcomes


def _busy_message(device: PciDevice, users, remedy: str) -> str:
    who = "; ".join(str(user) for user in users[:3])
    more = f" and {len(users) - 3} more" if len(users) > 3 else ""
    return f"{device.address} ({model(device)}) is in use: {who}{more}; {remedy}"


def _moves_for(root: HostRoot, devices: list[PciDevice], members_of) -> list[tuple[Member, str]]:
    """Each requested device with its group's other endpoints, each device once."""
    seen: dict[str, tuple[Member, str]] = {}
    for device in devices:
        members, group = members_of(device)
        for member in members:
            reason = ("requested" if member.address == device.address
                      else f"IOMMU group {group} of {device.address}")
            key = str(member.address)
            if key not in seen or reason == "requested":
                seen[key] = (member, reason)
    return list(seen.values())


def plan_detach(root: HostRoot, devices: list[PciDevice], force: bool = False,
                exempt: frozenset[str] = frozenset(),
                assume: dict[str, DeviceState] | None = None) -> Plan:
    """Every endpoint of each device's IOMMU group, to vfio-pci.

    Refuses (DeviceBusyError) a group with an endpoint the host uses, and a GPU that
    processes are using unless ``force``; HostNotReadyError for a device without a group.
    ``exempt``: addresses that were on vfio-pci a moment ago (``reset``), so not the
    host's; ``assume``: states to plan with instead of today's (``reset``'s dry run).
    """
    assume = assume or {}

    def members_of(device):
        group = read_group(root, device)
        require_movable(group, device.address, exempt)
        return group.endpoints, group.number

    moves = []
    for member, reason in _moves_for(root, devices, members_of):
        state = assume.get(str(member.address)) or read_state(root, member.address)
        if state.driver in VFIO_SAFE_DRIVERS:
            moves.append(Move(member, state, reason, noop=f"already on {state.driver}"))
            continue
        if kind_of(member.device) is not None and not force and str(member.address) not in assume:
            users = host_users(root, member.device)
            if users:
                raise DeviceBusyError(_busy_message(
                    member.device, users,
                    "stop those programs (nvidia-persistenced, fabric manager, CUDA jobs) "
                    "or pass --force (unbinding may then wait until they exit)"))
        moves.append(Move(member, state, reason))
    return Plan(DETACH, tuple(moves))


def plan_reattach(root: HostRoot, devices: list[PciDevice]) -> Plan:
    """Every endpoint of each device's group that is on vfio-pci, back to the host.

    Refuses (DeviceBusyError) a device a running VM holds through vfio.
    """

    def members_of(device):
        if device.iommu_group is None:  # never on vfio then; report it as it is
            return (read_member(root, device.address),), "-"
        group = read_group(root, device)
        return group.endpoints, group.number

    moves = []
    for member, reason in _moves_for(root, devices, members_of):
        state = read_state(root, member.address)
        if state.driver != VFIO_DRIVER:
            moves.append(Move(member, state, reason,
                              noop=f"not on {VFIO_DRIVER} (driver: {state.driver or 'none'})"))
            continue
        users = vm_users(root, member.device)
        if users:
            raise DeviceBusyError(_busy_message(
                member.device, users, "a running VM has it: stop that TD first"))
        moves.append(Move(member, state, reason))
    return Plan(REATTACH, tuple(moves))


def dry_run(plan: Plan, binder: Binder) -> list[str]:
    """What ``apply`` would do, one line per device and one per step."""
    where = f"to {VFIO_DRIVER}" if plan.to_vfio else "back to host drivers"
    lines = [f"{plan.action} {where} with {binder.method} (dry run, nothing changed):"]
    for move in plan.moves:
        head = f"  {move.address} {move.label}"
        if move.reason != "requested":
            head += f" [{move.reason}]"
        if move.noop:
            lines.append(f"{head}: {move.noop}, nothing to do")
            continue
        lines.append(f"{head}: {move.state.driver or 'no driver'} -> "
                     f"{VFIO_DRIVER if plan.to_vfio else 'host driver'}")
        steps = binder.steps_to_vfio(move.state) if plan.to_vfio else binder.steps_to_host(move.state)
        lines.extend(f"    {step.describe()}" for step in steps)
    return lines


@dataclass
class _Run:
    plan: Plan
    binder: Binder
    root: HostRoot
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    def _outcome(self, move: Move, result: str, ok: bool) -> None:
        now = read_state(self.root, move.state.address).driver
        self.outcomes[move.address] = Outcome(move.address, move.label, move.state.driver,
                                              now, result, ok)

    def _forward(self, move: Move) -> str:
        """Move one device; the result text, or StepFailed."""
        if self.plan.to_vfio:
            self.binder.run(self.binder.steps_to_vfio(move.state))
            now = read_state(self.root, move.state.address)
            if now.driver != VFIO_DRIVER:
                raise StepFailed(f"the kernel left it on {now.driver or 'no driver'} instead "
                                 f"of {VFIO_DRIVER} (dmesg may say why)")
            return f"detached: {move.state.driver or 'no driver'} -> {VFIO_DRIVER}"
        self.binder.run(self.binder.steps_to_host(move.state))
        now = read_state(self.root, move.state.address)
        if now.driver == VFIO_DRIVER:
            raise StepFailed(f"it is still on {VFIO_DRIVER}")
        if now.driver is None:
            return "released from vfio-pci; no host driver claimed it (is its driver loaded?)"
        return f"re-attached: {VFIO_DRIVER} -> {now.driver}"

    def _back(self, move: Move) -> str | None:
        """Undo ``move``; None when done, else what went wrong."""
        now = read_state(self.root, move.state.address)
        if now == move.state:
            return None  # the failure changed nothing on this one
        try:
            if self.plan.to_vfio:
                self.binder.run(self.binder.steps_to_host(now, restore=move.state))
                after = read_state(self.root, move.state.address)
                if after.driver == VFIO_DRIVER or (move.state.driver and after.driver is None):
                    return f"it is on {after.driver or 'no driver'}"
            else:
                self.binder.run(self.binder.steps_to_vfio(now, restore=move.state))
                if read_state(self.root, move.state.address).driver != VFIO_DRIVER:
                    return f"it did not go back to {VFIO_DRIVER}"
        except StepFailed as failure:
            return str(failure)
        return None

    def run(self) -> list[Outcome]:
        self.binder.check_ready(self.plan.to_vfio)
        done: list[Move] = []
        for index, move in enumerate(self.plan.moves):
            if move.noop:
                self._outcome(move, move.noop, True)
                continue
            try:
                self._outcome(move, self._forward(move), True)
                done.append(move)
            except StepFailed as failure:
                self._fail(move, failure, done, self.plan.moves[index + 1:])
        return [self.outcomes[move.address] for move in self.plan.moves]

    def _fail(self, failed: Move, failure: StepFailed, done: list[Move], rest) -> None:
        unrestored = []
        for move in [failed, *reversed(done)]:
            problem = self._back(move)
            if move is failed:
                text = f"FAILED: {failure}" + (f"; and could not undo it: {problem}" if problem else "")
                self._outcome(move, text, False)
            elif problem:
                self._outcome(move, f"ROLLBACK FAILED: {problem}", False)
            else:
                self._outcome(move, "rolled back (was moved, then put back)", False)
            if problem:
                unrestored.append(move.address)
        for move in rest:
            self._outcome(move, "not attempted" if not move.noop else move.noop, bool(move.noop))
        summary = (f"{self.plan.action} failed on {failed.address}: {failure}")
        if unrestored:
            fix = "reattach" if self.plan.to_vfio else "detach"
            summary += (f"; could NOT put back {', '.join(unrestored)}: check them with "
                        f"`tdxvirt gpu list` and `tdxvirt gpu {fix}` them by hand")
        elif done:
            summary += f"; the {len(done)} device(s) moved before it were put back"
        else:
            summary += "; nothing was changed"
        if failure.busy:
            summary += " (the device is busy: stop what uses it first)"
        ordered = [self.outcomes[move.address] for move in self.plan.moves
                   if move.address in self.outcomes]
        raise BindingError(summary, ordered)


def apply(plan: Plan, binder: Binder, root: HostRoot) -> list[Outcome]:
    """Perform ``plan``; all or nothing. Raises BindingError carrying every outcome."""
    return _Run(plan, binder, root).run()


def reset(root: HostRoot, devices: list[PciDevice], binder: Binder,
          force: bool = False) -> list[Outcome]:
    """Re-attach, then detach again: clears stale vfio / iommufd state before a TD
    restarts (what Canonical's scripts do with nodedev-reattach + nodedev-detach).

    Refusals either step would meet today are raised before anything changes.
    """
    first = plan_reattach(root, devices)
    plan_detach(root, devices, force)
    before = apply(first, binder, root)
    moved = frozenset(move.address for move in first.moves if not move.noop)
    try:
        after = apply(plan_detach(root, devices, force, exempt=moved), binder, root)
    except BindingError as error:
        raise BindingError(f"reset: re-attached, then {error}; those devices are on their "
                           "host drivers now", before + error.outcomes) from None
    except TdxvirtError as error:
        raise type(error)(f"reset: re-attached, but cannot detach again: {error}") from None
    return before + after


def dry_run_reset(root: HostRoot, devices: list[PciDevice], binder: Binder,
                  force: bool = False) -> list[str]:
    first = plan_reattach(root, devices)
    assume = {move.address: DeviceState(move.state.address, "its host driver", None)
              for move in first.moves if not move.noop}
    second = plan_detach(root, devices, force, exempt=frozenset(assume), assume=assume)
    return dry_run(first, binder) + dry_run(second, binder)
