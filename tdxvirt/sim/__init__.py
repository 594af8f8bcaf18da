"""The simulated TDX host: a fake host root plus libvirt 12.x's test driver.

Layout under ``<state dir>/sim``:
- ``forky/``: a Debian forky root whose libvirt 12.x daemon serves the TDX-aware
  test driver over ``forky/run/libvirt/libvirt-sock``
- ``trixie/``: a Debian trixie root with libvirt 11.x (no TDX XML) and QEMU
- ``hostroot/``: the fake sysfs / procfs / firmware tree (an H100 at 0000:38:00.0)
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
    def host_root(self) -> Path:
        return self.base / "hostroot"

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
            "STANDIN_SYSFS": str(self.host_root),
            "STANDIN_STATE": str(self.base / "gpu-modes.json"),
            "STANDIN_RECORD": str(self.base / "gpu-tool-runs.jsonl"),
        }

    @property
    def uri(self) -> str:
        return f"test+unix:///default?socket={self.socket}"

    @property
    def qemu_uri(self) -> str:
        """The forky daemon's real qemu driver (TCG only here)."""
        return f"qemu+unix:///system?socket={self.socket}"


def layout() -> SimLayout:
    return SimLayout(state_dir() / "sim")
