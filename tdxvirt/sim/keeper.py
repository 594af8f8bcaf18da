"""A process that holds one connection to the simulated host's test driver.

libvirt's test driver keeps ``test:///default`` state only while some connection is
open, so separate tdxvirt runs share domains only while this keeper lives. It
reconnects if the daemon restarts (state is lost then, as on a real reboot).

Run as ``python -m tdxvirt.sim.keeper URI``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..errors import SimulatorError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_pid(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def start(uri: str, pidfile: Path, logfile: Path, wait: float = 10.0) -> bool:
    """Start a keeper unless one runs; False when it already did."""
    if running_pid(pidfile):
        return False
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    ready = pidfile.with_suffix(".ready")
    ready.unlink(missing_ok=True)
    with open(logfile, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tdxvirt.sim.keeper", uri, str(ready)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )
    deadline = time.monotonic() + wait
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SimulatorError(f"the simulated host's keeper did not connect; see {logfile}")
        time.sleep(0.05)
    pidfile.write_text(f"{process.pid}\n")
    return True


def stop(pidfile: Path) -> bool:
    pid = running_pid(pidfile)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if not _alive(pid):
            break
        time.sleep(0.05)
    pidfile.unlink(missing_ok=True)
    return True


def main(uri: str, ready: str) -> None:
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    conn = libvirt.open(uri)
    Path(ready).write_text("ok\n")
    while True:
        time.sleep(2)
        try:
            conn.getLibVersion()
        except libvirt.libvirtError:
            try:
                conn = libvirt.open(uri)
                print("reconnected to", uri, flush=True)
            except libvirt.libvirtError as error:
                print("reconnect failed:", error, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
