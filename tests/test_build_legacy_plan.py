"""The source document's manifest plans today exactly what the default planned before #19.

``CAPTURED_PLANS`` (tests/data/legacy-build-plans.json) is `tdxvirt build plan` output captured before the
upstream manifest became the default, from the then-default manifest
(default-manifest.toml, now shipped as ``intel-device-passthrough``): every component
choice (all, kernel, qemu, ovmf), with and without ``--install``, text and ``--json``.
It was taken with a fake host root whose running kernel is 6.1.0-13-amd64 with
/boot/config-6.1.0-13-amd64, `--workdir <BASE>/work -j 4`; <MANIFEST> stands for the
manifest's path, <BASE> for the temporary folder. It is not edited by hand.

Today `plan` first says what the host has from its distribution; after that block the
output must be the captured one byte for byte: on a Debian 12-like root (nothing
there, so everything is planned) and, with ``--all``, on a root that has everything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tdxvirt.build.manifest import shipped_path
from tdxvirt.cli import main
from tdxvirt.sim.hostroot import build_host_root

RELEASE = "6.1.0-13-amd64"  # the running kernel of the capture's host root
NEW_JSON_KEYS = ("distribution", "selected", "planned", "all", "prerequisites")
# every choice the capture covers: component, --install, --json
KEYS = sorted(f"{c}{i}{j}" for c in ("all", "kernel", "qemu", "ovmf")
              for i in ("", " --install") for j in ("", " --json"))


def _root(base: Path, has_everything: bool) -> Path:
    """The capture's root: /proc/sys/kernel/osrelease and /boot/config-RELEASE as then;
    with ``has_everything`` also a TDX kernel, QEMU, libvirt and OVMF as forky has them."""
    root = base / "root"
    if has_everything:
        build_host_root(root)  # kvm_intel's tdx parameter Y, the TDX firmware descriptor
        (root / "var/lib/dpkg").mkdir(parents=True)
        (root / "var/lib/dpkg/status").write_text(
            "Package: qemu-system-x86\nStatus: install ok installed\nVersion: 1:10.1.0+ds-5\n\n"
            "Package: libvirt-daemon-driver-qemu\nStatus: install ok installed\nVersion: 11.6.0-1\n")
    (root / "proc/sys/kernel").mkdir(parents=True, exist_ok=True)
    (root / "proc/sys/kernel/osrelease").write_text(f"{RELEASE}\n")
    (root / "boot").mkdir()
    (root / f"boot/config-{RELEASE}").write_text("CONFIG_KVM=m\n")
    return root


def _plan(base: Path, root: Path, key: str, extra: list[str]) -> str:
    component, *flags = key.split(" ")
    args = ["--host-root", str(root), "build", "plan", component, "--workdir", str(base / "work"),
            "-j", "4", "--manifest", "intel-device-passthrough", *flags, *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.output


def _normalized(text: str, base: Path) -> str:
    return text.replace(str(shipped_path("intel-device-passthrough").resolve()), "<MANIFEST>") \
               .replace(str(base), "<BASE>")


def _planned_part(output: str, key: str, base: Path) -> str:
    """The output after the distribution block (the JSON without the new keys)."""
    if key.endswith("--json"):
        data = json.loads(output)
        for name in NEW_JSON_KEYS:
            data.pop(name)
        return _normalized(json.dumps(data, indent=2) + "\n", base)
    block, marker, rest = output.partition("\nManifest:       ")
    assert marker, output
    assert block.startswith("What this host has from its distribution (host root ")
    return _normalized(marker[1:] + rest, base)


@pytest.mark.parametrize("key", KEYS)
def test_the_source_documents_plan_is_byte_identical_on_a_host_without_tdx(tmp_path, key):
    root = _root(tmp_path, has_everything=False)
    output = _plan(tmp_path, root, key, [])
    assert _planned_part(output, key, tmp_path) == _expected(key)
    if not key.endswith("--json"):  # nothing there: every asked-for component is planned
        assert "\nPlanned: " in output and "--all plans every component" in output


@pytest.mark.parametrize("key", KEYS)
def test_the_source_documents_plan_is_byte_identical_with_all_on_a_host_with_tdx(tmp_path, key):
    root = _root(tmp_path, has_everything=True)
    output = _plan(tmp_path, root, key, ["--all"])
    assert _planned_part(output, key, tmp_path) == _expected(key)
    without_all = _plan(tmp_path, root, key, [])
    if key.endswith("--json"):
        assert json.loads(without_all)["steps"] == [] and json.loads(without_all)["planned"] == []
    else:
        assert "Nothing to build: this host has" in without_all and "Manifest:" not in without_all


def test_the_capture_covers_every_choice():
    assert sorted(CAPTURED_PLANS) == KEYS
    # what the capture pinned, in the words of the source document
    assert "fetch origin kvm-coco-queue-20240512" in CAPTURED_PLANS["all"]
    assert "--enable HYPERV --disable KEXEC --disable CRASH_DUMP" in CAPTURED_PLANS["kernel"]
    assert "./configure --enable-slirp --enable-kvm --target-list=x86_64-softmmu" in CAPTURED_PLANS["qemu"]
    assert "<BASE>/work/src/ovmf/<OUTPUT_DIRECTORY of OvmfPkg/OvmfPkgX64.dsc>/DEBUG_GCC6/FV/OVMF.fd" \
        in CAPTURED_PLANS["ovmf"]


# Captured once and never edited: tests/data/legacy-build-plans.json (key -> output).
CAPTURED_PLANS = json.loads((Path(__file__).parent / "data/legacy-build-plans.json").read_text())
# What changed on purpose since the capture, applied to it here (the file stays as it was
# captured): #27 gives BaseTools' make -j like every other make.
DELIBERATE_CHANGES = (("&& make -C BaseTools", "&& make -j4 -C BaseTools"),)


def _expected(key: str) -> str:
    text = CAPTURED_PLANS[key]
    for before, after in DELIBERATE_CHANGES:
        text = text.replace(before, after)
    return text
