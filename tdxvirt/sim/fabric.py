"""NVIDIA Fabric Manager and the NVLink subnet manager on the simulated HGX B200 host.

On a real HGX B200/B300 host they run beside libvirt and manage the NVLink switches
through the ConnectX functions; multi-GPU passthrough needs them running and Fabric
Manager configured with ``PARTITION_RAIL_POLICY=symmetric`` (doctor/gpuhost.py checks
the processes by name and that setting). NVIDIA's daemons need the hardware, so the
board's host runs stand-ins under their names: ``sleep`` copied from the root as
``nv-fabricmanager`` and ``nvlsm`` (what /proc shows for the real ones), started in
the emulated host's namespaces with its daemons, stopped with them, and the settings
file FM reads, as the simulated host's own file. A board without Fabric Manager has
neither (a settings file tdxvirt wrote is removed; any other is left alone).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

STANDINS = "usr/local/lib/tdxvirt-sim/fabric"
# the names the real binaries run under (host.fabric finds them by these)
DAEMONS = ("nv-fabricmanager", "nvlsm")
CONFIG = "usr/share/nvidia/nvswitch/fabricmanager.cfg"  # doctor.gpuhost.FM_CONFIG
MARK = "# written by tdxvirt's simulated host"
# The settings multi-GPU passthrough needs (FABRIC_MODE=1: shared NVSwitch, the GPUs in
# TDs and the fabric on the host; the rail policy as the word Fabric Manager 595+ reads).
SETTINGS = f"""{MARK} (HGX B200 board, `tdxvirt sim up --board`)
LOG_LEVEL=4
FABRIC_MODE=1
FABRIC_MODE_RESTART=0
PARTITION_RAIL_POLICY=symmetric
"""


def install(root: Path, present: bool) -> None:
    """The settings file and the stand-ins when the board has Fabric Manager; else no
    settings file of ours."""
    config = root / CONFIG
    if not present:
        if config.is_file() and config.read_text(errors="replace").startswith(MARK):
            config.unlink()
        return
    config.parent.mkdir(parents=True, exist_ok=True)
    if not config.exists() or config.read_text(errors="replace") != SETTINGS:
        config.write_text(SETTINGS)
    standins = root / STANDINS
    standins.mkdir(parents=True, exist_ok=True)
    for name in DAEMONS:
        if not (standins / name).exists():
            shutil.copy2(root / "usr/bin/sleep", standins / name)


def start(root: Path) -> None:
    """Inside the emulated host's namespaces: each stand-in chrooted into the root, its
    pid where chroot.stop_daemons looks (run/NAME.pid)."""
    for name in DAEMONS:
        process = subprocess.Popen(["chroot", str(root), f"/{STANDINS}/{name}", "infinity"],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        (root / "run" / f"{name}.pid").write_text(f"{process.pid}\n")
