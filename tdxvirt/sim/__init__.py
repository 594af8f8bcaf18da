"""The simulated TDX host: libvirt's real qemu driver made to believe in KVM + TDX,
libvirt 12.x's test driver, and a fake host root.

Layout under ``<state dir>/sim``:
- ``forky/``: a Debian forky root whose libvirt 12.x daemon runs as the emulated TDX
  host (tdxhost.py) and serves, over ``forky/run/libvirt/libvirt-sock``, both its
  qemu driver (``qemu_uri``, what ``--sim`` targets) and the TDX-aware test driver
  (``test_uri``: fast fixtures, 1,000-TD benchmarks)
- ``forky-devices/``, ``trixie-devices/``: each daemon's device tree (sysfs of the
  simulated H100, ``kvm_intel`` ``tdx=Y``), bound into its namespace only; with the
  forky root, the host tdxvirt reads for ``--sim`` (``host()``, onehost.py)
- ``trixie/``: a Debian trixie root with libvirt 11.x (no TDX XML) and QEMU, run the
  same way (its libvirt believes in KVM; its QEMU 10.0 has no ``tdx-guest``)
- ``keeper.pid``: the process holding a connection open, because the test driver
  forgets every domain once no connection to it is left
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..paths import state_dir


@dataclass(frozen=True)
class SimLayout:
    base: Path

    @property
    def chroot(self) -> Path:
        return self.base / "forky"

    @property
    def socket(self) -> Path:
        return self.chroot / "run/libvirt/libvirt-sock"

    @property
    def legacy_chroot(self) -> Path:
        """The trixie root: libvirt 11.x, which knows no TDX XML."""
        return self.base / "trixie"

    @property
    def legacy_socket(self) -> Path:
        return self.legacy_chroot / "run/libvirt/libvirt-sock"

    @property
    def legacy_qemu_uri(self) -> str:
        return f"qemu+unix:///system?socket={self.legacy_socket}"

    @property
    def devices(self) -> Path:
        return self.base / "forky-devices"

    @property
    def board_file(self) -> Path:
        return self.base / "board"

    @property
    def board(self) -> str:
        """The emulated TDX host's board (boards.py), as `sim up --board` last chose it."""
        from .boards import BOARDS, DEFAULT_BOARD

        try:
            name = self.board_file.read_text().strip()
        except OSError:
            return DEFAULT_BOARD
        return name if name in BOARDS else DEFAULT_BOARD

    @property
    def legacy_devices(self) -> Path:
        return self.base / "trixie-devices"

    def host(self):
        """The simulated host as tdxvirt reads it: the forky root with the device tree's
        /sys, /dev and /proc files over it, as its daemon sees them (onehost.py)."""
        from .onehost import SimHostRoot

        return SimHostRoot(self)

    @property
    def keeper_pidfile(self) -> Path:
        return self.base / "keeper.pid"

    @property
    def keeper_log(self) -> Path:
        return self.base / "keeper.log"

    @property
    def gpu_tool_env(self) -> dict[str, str]:
        """NVIDIA's tool for the simulated host: a stand-in printing the real tool's
        output, keeping the fake GPU's CC / PPCIe modes in a file (CC off, as the
        real H100 reported)."""
        from pathlib import Path as _Path

        return {
            "TDXVIRT_GPU_TOOLS": str(_Path(__file__).with_name("standin_gpu_tools.py")),
            "STANDIN_SYSFS": str(self.devices),
            "STANDIN_STATE": str(self.base / "gpu-modes.json"),
            "STANDIN_RECORD": str(self.base / "gpu-tool-runs.jsonl"),
        }

    @property
    def test_uri(self) -> str:
        """libvirt 12.x's TDX-aware test driver (kept alive by the keeper)."""
        return f"test+unix:///default?socket={self.socket}"

    @property
    def uri(self) -> str:
        """What ``--sim`` targets: the emulated TDX host's real qemu driver."""
        return self.qemu_uri

    @property
    def qemu_uri(self) -> str:
        """The forky daemon's real qemu driver, believing in KVM + TDX."""
        return f"qemu+unix:///system?socket={self.socket}"


def layout() -> SimLayout:
    return SimLayout(state_dir() / "sim")
