#!/usr/bin/python3
"""The emulator libvirt runs on the emulated TDX host (the forky root's QEMU, seen as KVM).

Installed into the simulated host's Debian root and bind-mounted over
``/usr/bin/qemu-system-x86_64`` inside the emulated host's mount namespace only; it
runs under that root's own python3 and imports nothing but the standard library.

It never changes what libvirt decided; it only takes out what needs KVM or TDX
hardware, which this machine does not have, and records the rest:

- **Capability probing** (``-machine none,accel=kvm:tcg ... -daemonize``): the real
  QEMU probes under TCG behind a QMP relay that gives the answers that differ on a KVM
  host: ``query-kvm`` and ``query-accelerators`` say KVM is enabled, and the CPU model
  ``host`` (which exists only with an accelerator) is expanded as ``max``. Every other
  QMP message passes byte for byte.
- **A domain start**: the full command line libvirt gave is appended to
  ``/var/log/tdxvirt-sim/NAME.argv.jsonl`` (with what ran), then the real QEMU runs the
  same machine under TCG minus: the ``tdx-guest`` object and the machine's
  ``confidential-guest-support`` / ``kernel_irqchip`` properties, ``-accel kvm``
  (TCG instead), ``-cpu host`` (``max`` instead), and the ``iommufd`` objects and
  ``vfio-pci`` devices (there is no GPU behind the file descriptors libvirt passed).
"""

import json
import os
import selectors
import socket
import sys
import time

REAL_QEMU = "/usr/local/lib/tdxvirt-sim/qemu-system-x86_64.real"
# The real binaries of the host's other emulators (a QEMU `tdxvirt build` installed in
# /usr/local/bin or /opt/NAME/bin), each bound at its path with "/" as "_": the wrapper
# is bound over every one of them, and the path libvirt ran says which QEMU is meant.
REAL_DIR = "/usr/local/lib/tdxvirt-sim/real"
real_qemu = REAL_QEMU


def real_binary(invoked: str) -> str:
    """The real QEMU behind the emulator path libvirt ran (this script's argv[0])."""
    candidate = os.path.join(REAL_DIR, invoked.strip("/").replace("/", "_"))
    return candidate if invoked != "/usr/bin/qemu-system-x86_64" and os.path.isfile(candidate) \
        else REAL_QEMU
RECORD_DIR = "/var/log/tdxvirt-sim"
HARDWARE_OBJECTS = ("tdx-guest", "iommufd")
HARDWARE_DEVICES = ("vfio-pci",)
HARDWARE_MACHINE_PROPS = ("confidential-guest-support", "kernel_irqchip", "kernel-irqchip")


def _option_kind(value: str, key: str) -> str:
    """The qom-type/driver of an -object/-device value in JSON or key=value form."""
    if value.startswith("{"):
        try:
            return json.loads(value).get(key, "")
        except ValueError:
            return ""
    return value.split(",", 1)[0]


def _machine(value: str) -> str:
    props = [p for p in value.split(",") if p.split("=", 1)[0] not in HARDWARE_MACHINE_PROPS]
    return ",".join("accel=tcg" if p.startswith("accel=") else p for p in props)


def for_tcg(argv: list[str]) -> list[str]:
    """libvirt's command line minus what needs KVM/TDX hardware."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) else None
        if arg == "-accel" and value is not None and value.split(",")[0] == "kvm":
            out += [arg, "tcg"]
        elif arg == "-machine" and value is not None:
            out += [arg, _machine(value)]
        elif arg == "-cpu" and value is not None and value.split(",")[0] == "host":
            out += [arg, "max" + value[len("host"):]]
        elif arg == "-object" and value is not None and _option_kind(value, "qom-type") in HARDWARE_OBJECTS:
            pass
        elif arg == "-device" and value is not None and _option_kind(value, "driver") in HARDWARE_DEVICES:
            pass
        else:
            out.append(arg)
            i += 1
            continue
        i += 2
    return out


def _domain_name(argv: list[str]) -> str:
    for i, arg in enumerate(argv[:-1]):
        if arg == "-name":
            for part in argv[i + 1].split(","):
                if part.startswith("guest="):
                    return part[len("guest="):]
            return argv[i + 1].split(",")[0]
    return "unnamed"


def record(argv: list[str], ran: list[str]) -> None:
    os.makedirs(RECORD_DIR, exist_ok=True)
    name = _domain_name(argv).replace("/", "_")
    entry = {"time": time.time(), "pid": os.getpid(), "argv": argv, "ran": ran, "real": real_qemu}
    with open(os.path.join(RECORD_DIR, name + ".argv.jsonl"), "a") as log:
        log.write(json.dumps(entry) + "\n")


# --- capability probing --------------------------------------------------------------

def _rewrite_reply(command: dict, reply: dict) -> dict:
    name = command.get("execute")
    if "return" not in reply:
        return reply
    if name == "query-kvm":
        reply["return"] = {"enabled": True, "present": True}
    elif name == "query-accelerators":
        ret = reply["return"]
        ret["enabled"] = "kvm"
        if isinstance(ret.get("present"), list) and "kvm" not in ret["present"]:
            ret["present"].append("kvm")
    elif name == "query-cpu-model-expansion" and command.get("_asked_host"):
        reply["return"]["model"]["name"] = "host"
    return reply


def _rewrite_command(command: dict) -> dict:
    if command.get("execute") == "query-cpu-model-expansion":
        model = command.get("arguments", {}).get("model", {})
        if model.get("name") == "host":
            model["name"] = "max"
            command["_asked_host"] = True
    return command


def relay(client: socket.socket, upstream: socket.socket) -> None:
    """Line-wise QMP relay that rewrites what differs on a KVM host."""
    pending: dict = {}
    buffers = {client: b"", upstream: b""}
    peer = {client: upstream, upstream: client}
    selector = selectors.DefaultSelector()
    selector.register(client, selectors.EVENT_READ)
    selector.register(upstream, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            source = key.fileobj
            data = source.recv(65536)
            if not data:
                return
            buffers[source] += data
            while b"\n" in buffers[source]:
                line, buffers[source] = buffers[source].split(b"\n", 1)
                peer[source].sendall(_rewrite_line(line, source is client, pending) + b"\n")


def _rewrite_line(line: bytes, from_client: bool, pending: dict) -> bytes:
    try:
        message = json.loads(line)
    except ValueError:
        return line
    if not isinstance(message, dict):
        return line
    if from_client:
        if "execute" not in message:
            return line
        command = _rewrite_command(json.loads(line))
        pending[json.dumps(message.get("id"))] = command
        if not command.get("_asked_host"):
            return line
        sent = {k: v for k, v in command.items() if k != "_asked_host"}
        return json.dumps(sent).encode() + (b"\r" if line.endswith(b"\r") else b"")
    if "return" not in message and "error" not in message:  # events, the greeting
        return line
    command = pending.pop(json.dumps(message.get("id")), None)
    if command is None or command.get("execute") not in (
            "query-kvm", "query-accelerators", "query-cpu-model-expansion"):
        return line
    return json.dumps(_rewrite_reply(command, message)).encode() + b"\r"


def probe(argv: list[str]) -> int:
    """Run the real QEMU's probe under TCG behind a relay at libvirt's monitor path."""
    qmp_at = argv.index("-qmp") + 1
    spec = argv[qmp_at]
    path = spec[len("unix:"):].split(",", 1)[0]
    upstream_path = path + ".tcg"
    real_argv = for_tcg(list(argv))
    real_argv[real_argv.index("-qmp") + 1] = "unix:" + upstream_path + spec[len("unix:") + len(path):]
    status = os.spawnv(os.P_WAIT, real_qemu, [real_qemu] + real_argv)
    if status != 0:
        return status
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    if os.fork() != 0:
        return 0  # libvirt connects once this process (the "daemonizing" QEMU) exits
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    listener.settimeout(60)
    try:
        client, _ = listener.accept()
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(upstream_path)
        relay(client, upstream)
    except OSError:
        pass
    finally:
        for stale in (path, upstream_path):
            try:
                os.unlink(stale)
            except OSError:
                pass
    os._exit(0)


def _value(argv: list[str], option: str) -> str:
    return argv[argv.index(option) + 1] if option in argv[:-1] else ""


def main(argv: list[str], invoked: str = "/usr/bin/qemu-system-x86_64") -> int:
    global real_qemu
    real_qemu = real_binary(invoked)
    machine = _value(argv, "-machine")
    if "-daemonize" in argv and machine.startswith("none"):  # libvirt probing capabilities
        if "accel=kvm" in machine and _value(argv, "-qmp").startswith("unix:"):
            return probe(argv)
        os.execv(real_qemu, [real_qemu] + argv)
    if "-name" not in argv:  # -version, -help, anything but a domain
        os.execv(real_qemu, [real_qemu] + argv)
    ran = for_tcg(argv)
    record(argv, ran)
    os.execv(real_qemu, [real_qemu] + ran)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], sys.argv[0]))
