"""Moving devices to vfio-pci and back: the sysfs method against a fake tree with an
emulated kernel (the test reads the tree afterwards), the libvirt method against a
recording stand-in whose calls are checked against the real libvirt-python classes."""

from __future__ import annotations

import errno
import inspect
import shutil
import tempfile
from pathlib import Path

import libvirt
import pytest
from gpu_fakes import HGX_GPUS, FakeKernel, RecordingConnect, audio, build, driver_of, h100, override_of
from hypothesis import given, settings
from hypothesis import strategies as st

from tdxvirt.errors import HostNotReadyError
from tdxvirt.gpu import vfio
from tdxvirt.gpu.binding import LibvirtBinder, SysfsBinder, nodedev_name, read_state
from tdxvirt.gpu.devices import read_targets
from tdxvirt.pci import PciAddress

GPUS = ("0000:18:00.0", "0000:2a:00.0", "0000:3a:00.0")
# Paths as the binder names them inside the fake host root (FakeKernel records them).
FAKE_ROOT_DEVICES = "/sys/bus/pci/devices"


def snapshot(root):
    """Every device's driver and driver_override, read from the tree."""
    devices = sorted(p.name for p in root.path("/sys/bus/pci/devices").iterdir())
    return {bdf: (driver_of(root, bdf), override_of(root, bdf)) for bdf in devices}


def three_gpus(tmp_path, **kernel):
    root = build(tmp_path / "r", tuple(h100(a, group=10 + i) for i, a in enumerate(GPUS)))
    return root, FakeKernel(root, **kernel)


def detach(root, binder, *bdfs, force=False):
    return vfio.apply(vfio.plan_detach(root, read_targets(root, bdfs), force), binder, root)


def reattach(root, binder, *bdfs):
    return vfio.apply(vfio.plan_reattach(root, read_targets(root, bdfs)), binder, root)


# ---------------------------------------------------------------- sysfs


def test_sysfs_detach_writes_override_unbind_probe_and_ends_on_vfio(tmp_path):
    root = build(tmp_path / "r", (h100("0000:38:00.0"), audio("0000:38:00.1", 42)))
    kernel = FakeKernel(root)
    outcomes = detach(root, SysfsBinder(root, kernel), "38:00.0")
    assert [(o.address, o.before, o.after, o.ok) for o in outcomes] == [
        ("0000:38:00.0", "nvidia", "vfio-pci", True),
        ("0000:38:00.1", "snd_hda_intel", "vfio-pci", True)]
    assert kernel.writes[:3] == [
        (f"{FAKE_ROOT_DEVICES}/0000:38:00.0/driver_override", "vfio-pci"),
        (f"{FAKE_ROOT_DEVICES}/0000:38:00.0/driver/unbind", "0000:38:00.0"),
        ("/sys/bus/pci/drivers_probe", "0000:38:00.0")]
    assert snapshot(root) == {"0000:38:00.0": ("vfio-pci", "vfio-pci"),
                              "0000:38:00.1": ("vfio-pci", "vfio-pci")}
    assert not any("new_id" in path for path, _ in kernel.writes)


def test_sysfs_detach_then_reattach_returns_to_the_start(tmp_path):
    root = build(tmp_path / "r", (h100("0000:38:00.0"), audio("0000:38:00.1", 42)))
    start = snapshot(root)
    binder = SysfsBinder(root, FakeKernel(root))
    detach(root, binder, "38:00.0")
    outcomes = reattach(root, binder, "38:00.0")
    assert [o.result for o in outcomes] == ["re-attached: vfio-pci -> nvidia",
                                            "re-attached: vfio-pci -> snd_hda_intel"]
    assert snapshot(root) == start == {"0000:38:00.0": ("nvidia", "(null)"),
                                       "0000:38:00.1": ("snd_hda_intel", "(null)")}


def test_detach_is_idempotent(tmp_path):
    root, kernel = three_gpus(tmp_path)
    binder = SysfsBinder(root, kernel)
    detach(root, binder, GPUS[0])
    writes = len(kernel.writes)
    [again] = detach(root, binder, GPUS[0])
    assert (again.result, again.ok) == ("already on vfio-pci", True)
    assert len(kernel.writes) == writes


def test_failure_on_the_third_puts_the_first_two_back_and_reports_all(tmp_path):
    # vfio-pci's probe of the third GPU fails: the kernel leaves it without a driver.
    root, kernel = three_gpus(tmp_path, refuse={(GPUS[2], "vfio-pci")})
    start = snapshot(root)
    with pytest.raises(vfio.BindingError) as failed:
        detach(root, SysfsBinder(root, kernel), *GPUS)
    outcomes = {o.address: o for o in failed.value.outcomes}
    assert [outcomes[a].ok for a in GPUS] == [False, False, False]
    assert outcomes[GPUS[0]].result == outcomes[GPUS[1]].result == "rolled back (was moved, then put back)"
    assert outcomes[GPUS[2]].result.startswith("FAILED: the kernel left it on no driver")
    message = str(failed.value)
    assert message.startswith(f"detach failed on {GPUS[2]}")
    assert "the 2 device(s) moved before it were put back" in message and "\n" not in message
    assert snapshot(root) == start  # read back from the tree: nvidia, no override


def test_a_write_the_kernel_rejects_as_busy_is_reported_and_undone(tmp_path):
    unbind = f"{FAKE_ROOT_DEVICES}/{GPUS[1]}/driver/unbind"
    root, kernel = three_gpus(tmp_path, fail={(unbind, GPUS[1]): errno.EBUSY})
    start = snapshot(root)
    with pytest.raises(vfio.BindingError) as failed:
        detach(root, SysfsBinder(root, kernel), *GPUS)
    assert "Device or resource busy" in str(failed.value)
    assert "the device is busy: stop what uses it first" in str(failed.value)
    assert [o.result for o in failed.value.outcomes][2] == "not attempted"
    assert snapshot(root) == start


def test_reattach_failure_puts_the_others_back_on_vfio(tmp_path):
    root = build(tmp_path / "r", tuple(h100(a, group=10 + i, driver="vfio-pci")
                                      for i, a in enumerate(GPUS)))
    kernel = FakeKernel(root, natural={a: "nvidia" for a in GPUS},
                        fail={(f"{FAKE_ROOT_DEVICES}/{GPUS[1]}/driver/unbind", GPUS[1]): errno.EIO})
    start = snapshot(root)
    with pytest.raises(vfio.BindingError, match=f"reattach failed on {GPUS[1]}"):
        reattach(root, SysfsBinder(root, kernel), *GPUS)
    assert snapshot(root) == start


def test_reset_reattaches_then_detaches(tmp_path):
    root = build(tmp_path / "r", (h100("0000:38:00.0", driver="vfio-pci"),
                                  audio("0000:38:00.1", 42, driver="vfio-pci")))
    kernel = FakeKernel(root, natural={"0000:38:00.0": "nvidia", "0000:38:00.1": "snd_hda_intel"})
    outcomes = vfio.reset(root, read_targets(root, ["38:00.0"]), SysfsBinder(root, kernel))
    assert [(o.address, o.result) for o in outcomes] == [
        ("0000:38:00.0", "re-attached: vfio-pci -> nvidia"),
        ("0000:38:00.1", "re-attached: vfio-pci -> snd_hda_intel"),
        ("0000:38:00.0", "detached: nvidia -> vfio-pci"),
        ("0000:38:00.1", "detached: snd_hda_intel -> vfio-pci")]
    probes = [value for path, value in kernel.writes if path.endswith("drivers_probe")]
    assert probes == ["0000:38:00.0", "0000:38:00.1"] * 2
    assert snapshot(root) == {"0000:38:00.0": ("vfio-pci", "vfio-pci"),
                              "0000:38:00.1": ("vfio-pci", "vfio-pci")}


def test_dry_run_lists_the_writes_and_changes_nothing(tmp_path):
    root = build(tmp_path / "r", (h100("0000:38:00.0"),))
    start = snapshot(root)
    kernel = FakeKernel(root)
    lines = vfio.dry_run(vfio.plan_detach(root, read_targets(root, ["38:00.0"])),
                         SysfsBinder(root, kernel))
    base = root.path("/sys/bus/pci")
    assert lines[1:] == [
        "  0000:38:00.0 H100 SXM5 80GB: nvidia -> vfio-pci",
        f"    write 'vfio-pci' to {base}/devices/0000:38:00.0/driver_override",
        f"    write '0000:38:00.0' to {base}/devices/0000:38:00.0/driver/unbind  (unbinds nvidia)",
        f"    write '0000:38:00.0' to {base}/drivers_probe  (binds vfio-pci)"]
    assert kernel.writes == [] and snapshot(root) == start


def test_sysfs_method_needs_vfio_pci_loaded(tmp_path):
    root = build(tmp_path / "r", (h100("0000:38:00.0"),))
    shutil.rmtree(root.path("/sys/bus/pci/drivers/vfio-pci"))
    with pytest.raises(HostNotReadyError, match="modprobe vfio-pci"):
        detach(root, SysfsBinder(root, FakeKernel(root)), "38:00.0")
    assert driver_of(root, "0000:38:00.0") == "nvidia"


@settings(max_examples=25, deadline=None)
@given(count=st.integers(1, 5), data=st.data())
def test_any_failure_leaves_every_device_as_it_was(count, data):
    """All or nothing, whichever device fails and however (probe refused, write error)."""
    failing = data.draw(st.integers(0, count - 1))
    how = data.draw(st.sampled_from(["probe", "override", "unbind", "probe-write"]))
    addresses = HGX_GPUS[:count]
    work = Path(tempfile.mkdtemp())
    try:
        root = build(work / "r", tuple(h100(a, group=10 + i) for i, a in enumerate(addresses)))
        bad = addresses[failing]
        refuse, fail = set(), {}
        if how == "probe":
            refuse = {(bad, "vfio-pci")}
        elif how == "override":
            fail = {(f"{FAKE_ROOT_DEVICES}/{bad}/driver_override", "vfio-pci"): errno.EINVAL}
        elif how == "unbind":
            fail = {(f"{FAKE_ROOT_DEVICES}/{bad}/driver/unbind", bad): errno.EBUSY}
        else:
            fail = {("/sys/bus/pci/drivers_probe", bad): errno.ENODEV}
        start = snapshot(root)
        with pytest.raises(vfio.BindingError) as failed:
            detach(root, SysfsBinder(root, FakeKernel(root, refuse=refuse, fail=fail)), *addresses)
        assert snapshot(root) == start
        results = [o.result for o in failed.value.outcomes]
        assert results[failing].startswith("FAILED")
        assert all(r.startswith("rolled back") for r in results[:failing])
        assert all(r == "not attempted" for r in results[failing + 1:])
    finally:
        shutil.rmtree(work)


# ---------------------------------------------------------------- libvirt


def test_libvirt_detach_and_reattach_calls(tmp_path):
    root = build(tmp_path / "r", (h100("0000:38:00.0"), audio("0000:38:00.1", 42)))
    conn = RecordingConnect(FakeKernel(root))
    binder = LibvirtBinder(lambda: conn)
    detach(root, binder, "38:00.0")
    assert conn.calls == [
        ("virConnect", "nodeDeviceLookupByName", ("pci_0000_38_00_0",), {}),
        ("virNodeDevice", "detachFlags", ("vfio", 0), {}),
        ("virConnect", "nodeDeviceLookupByName", ("pci_0000_38_00_1",), {}),
        ("virNodeDevice", "detachFlags", ("vfio", 0), {})]
    assert snapshot(root)["0000:38:00.0"] == ("vfio-pci", "vfio-pci")
    conn.calls.clear()
    reattach(root, binder, "38:00.0")
    assert [c[1] for c in conn.calls] == ["nodeDeviceLookupByName", "reAttach"] * 2
    assert snapshot(root)["0000:38:00.0"] == ("nvidia", "(null)")


def test_libvirt_failure_on_the_third_reattaches_the_first_two(tmp_path):
    root, kernel = three_gpus(tmp_path)
    start = snapshot(root)
    conn = RecordingConnect(kernel, unknown={nodedev_name(PciAddress.parse(GPUS[2]))})
    with pytest.raises(vfio.BindingError) as failed:
        detach(root, LibvirtBinder(lambda: conn), *GPUS)
    assert "Node device not found" in str(failed.value)  # libvirt's own message
    assert [c[1] for c in conn.calls] == (["nodeDeviceLookupByName", "detachFlags"] * 2
                                          + ["nodeDeviceLookupByName"]
                                          + ["nodeDeviceLookupByName", "reAttach"] * 2)
    assert [c[2][0] for c in conn.calls if c[1] == "nodeDeviceLookupByName"][-2:] == [
        "pci_0000_2a_00_0", "pci_0000_18_00_0"]  # put back in reverse order
    assert snapshot(root) == start


def test_libvirt_dry_run_names_the_calls_and_opens_nothing(tmp_path):
    root = build(tmp_path / "r", (h100("0000:38:00.0"),))

    def no_libvirt():
        raise AssertionError("a dry run must not open libvirt")

    lines = vfio.dry_run(vfio.plan_detach(root, read_targets(root, ["38:00.0"])),
                         LibvirtBinder(no_libvirt))
    assert lines[2:] == [
        "    virConnect.nodeDeviceLookupByName('pci_0000_38_00_0')  # virNodeDeviceLookupByName",
        "    virNodeDevice.detachFlags('vfio', 0)  # virNodeDeviceDetachFlags"]


def test_recorded_calls_are_exactly_libvirt_python_methods_and_arguments(tmp_path):
    """Contract: every call the binder makes (as recorded) exists on the real
    libvirt-python class with that signature, maps to the C API the dry run names,
    and passes arguments of the annotated types."""
    root, kernel = three_gpus(tmp_path)
    conn = RecordingConnect(kernel, unknown={nodedev_name(PciAddress.parse(GPUS[2]))})
    binder = LibvirtBinder(lambda: conn)
    with pytest.raises(vfio.BindingError):
        detach(root, binder, *GPUS)
    reattach(root, binder, GPUS[0])  # nothing on vfio now: a no-op, so move one first
    detach(root, binder, GPUS[0])
    reattach(root, binder, GPUS[0])
    steps = (binder.steps_to_vfio(read_state(root, PciAddress.parse(GPUS[0])))
             + binder.steps_to_host(read_state(root, PciAddress.parse(GPUS[0]))))
    c_api = {(s.target, s.method): s.c_api for s in steps}
    seen = set()
    for target, method, args, kwargs in conn.calls:
        cls = getattr(libvirt, target)
        real = getattr(cls, method)
        bound = inspect.signature(real).bind(None, *args, **kwargs)
        for name, value in list(bound.arguments.items())[1:]:
            annotation = inspect.signature(real).parameters[name].annotation
            assert isinstance(value, {"str": str, "Optional[int]": int}[annotation]), (method, name)
        assert f"libvirtmod.{c_api[(target, method)]}(" in inspect.getsource(real)
        seen.add((target, method))
    assert seen == {("virConnect", "nodeDeviceLookupByName"), ("virNodeDevice", "detachFlags"),
                    ("virNodeDevice", "reAttach")}
    # The recording double offers exactly these methods, nothing libvirt lacks.
    for target, method in seen:
        assert callable(getattr(libvirt, target).__dict__[method])
