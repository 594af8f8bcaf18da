"""Without libvirt's Python bindings: one line naming the package; host-only commands work."""

from __future__ import annotations

import subprocess
import sys

# sys.modules["libvirt"] = None makes `import libvirt` fail as on a host without the bindings.
RUN = "import sys; sys.modules['libvirt'] = None; from tdxvirt.cli import main; sys.exit(main())"


def tdxvirt_without_libvirt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_libvirt_commands_say_which_package_to_install():
    done = tdxvirt_without_libvirt("list")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "tdxvirt: error: libvirt's Python bindings are not installed; install them: "
        "Debian/Ubuntu `apt install python3-libvirt` (for the system Python), or `pip install "
        "libvirt-python` (needs libvirt-dev, pkg-config and gcc)"]


def test_gpu_list_and_host_check_work_without_libvirt(sim):
    listed = tdxvirt_without_libvirt("--sim", "gpu", "list")
    assert listed.returncode == 0 and "0000:38:00.0" in listed.stdout
    assert "python3-libvirt" in listed.stderr and "Traceback" not in listed.stderr
    checked = tdxvirt_without_libvirt("--sim", "host", "check")
    assert "Traceback" not in checked.stderr
    assert "libvirt: connection" in checked.stdout and "python3-libvirt" in checked.stdout
    assert "cpu: kvm_intel tdx" in checked.stdout  # host facts are still checked
