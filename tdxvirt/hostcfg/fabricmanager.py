"""NVIDIA Fabric Manager's settings file: the one setting multi-GPU passthrough needs.

On HGX B200/B300, Fabric Manager 595+ leaves confidential computing off without saying
so unless ``PARTITION_RAIL_POLICY=symmetric`` (the word: ``1`` is not accepted). The
file is ``KEY=VALUE`` lines and ``#`` comments, the last active line of a key winning;
`host check` reads it with ``rail_policy`` and `host setup` changes only that line
(or adds it), keeping every other byte, so `--revert` has one line to take back.
"""

from __future__ import annotations

PATH = "/usr/share/nvidia/nvswitch/fabricmanager.cfg"
RAIL_POLICY = "PARTITION_RAIL_POLICY"
WANTED = "symmetric"
LIMIT = 256 * 1024  # the shipped file is a few KiB


def _active_key(line: str) -> str | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#") or "=" not in stripped:
        return None
    return stripped.partition("=")[0].strip()


def rail_policy(text: str) -> str | None:
    """The value Fabric Manager reads for the rail policy, or None when it is not set."""
    value = None
    for line in text.splitlines():
        if _active_key(line) == RAIL_POLICY:
            value = line.strip().partition("=")[2].strip()
    return value


def set_rail_policy(text: str) -> str:
    """``text`` with the rail policy ``symmetric``: its last active line rewritten (the
    one that counts), or a line added at the end."""
    lines = text.splitlines(keepends=True)
    last = max((i for i, line in enumerate(lines) if _active_key(line) == RAIL_POLICY), default=None)
    if last is not None:
        ending = "\n" if lines[last].endswith("\n") else ""
        lines[last] = f"{RAIL_POLICY}={WANTED}{ending}"
        return "".join(lines)
    if text and not text.endswith("\n"):
        text += "\n"
    return (text + "# multi-GPU passthrough (confidential computing): added by `tdxvirt host setup`\n"
            f"{RAIL_POLICY}={WANTED}\n")
