"""Mixed lifecycle races on one TD (issue 25): starts and destroys at once, each a
process of its own, end in one consistent state whoever wins: every command exits 0 or
says in one line why not, libvirt shows the TD running or shut off, and a running TD
has exactly one QEMU."""

from __future__ import annotations

import subprocess

from conftest import TDXVIRT


def _qemus(name: str) -> int:
    """QEMU processes of this domain on this machine (the emulated host's namespaces
    share its process table)."""
    found = subprocess.run(["pgrep", "-f", f"guest={name},"], capture_output=True, text=True)
    return len(found.stdout.split())


def test_starts_and_destroys_racing_end_consistent(td, sim, qemu_conn, cc_on):
    for _ in range(3):
        racers = [subprocess.Popen([TDXVIRT, "--sim", verb, td], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
                  for verb in ("start", "destroy", "start", "destroy", "start")]
        for racer in racers:
            code = racer.wait(timeout=180)
            err = racer.stderr.read()
            assert "Traceback" not in err, err
            assert code == 0 or (len(err.strip().splitlines()) == 1 and err.startswith("tdxvirt: ")), err
        running = qemu_conn.lookupByName(td).isActive()
        assert _qemus(td) == (1 if running else 0), (running, _qemus(td))
    subprocess.run([TDXVIRT, "--sim", "destroy", td], capture_output=True)
    assert _qemus(td) == 0
