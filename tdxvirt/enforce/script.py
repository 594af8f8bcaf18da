"""The file installed as libvirt's qemu hook, and whether a host has the current one.

The script is small and imports only the standard library until it knows the domain
is a TD: a domain that is neither recorded (a file named by its UUID in root's record
directory) nor mentions TDX anywhere in its XML is let through before tdxvirt is
loaded, so a broken or removed tdxvirt never stops an ordinary VM. For a TD anything
that goes wrong (tdxvirt cannot be loaded, an exception) refuses the start: fail
closed, for TDs only.
"""

from __future__ import annotations

import sys

HOOK = "/etc/libvirt/hooks/qemu.d/tdxvirt"
HOOK_DIR_MODE = 0o755
HOOK_MODE = 0o755
STDIN_LIMIT = 64 << 20  # a domain's XML; more is refused for a TD, ignored for a VM

_SCRIPT = '''\
#!{interpreter} -I
# tdxvirt's libvirt qemu hook: a TD is started only while it is the TD root recorded,
# whichever tool starts it. Written by `tdxvirt host setup` (`--revert` removes it);
# `tdxvirt host check` says whether it is current. Do not edit.
import os
import re
import sys

RECORDS = {records!r}
CODE = {code!r}
ENVIRONMENT = {environment!r}  # for NVIDIA's tool (the simulated host's stand-in)
LIMIT = {limit!r}
CHECKED = (("prepare", "begin"), ("restore", "begin"), ("migrate", "begin"))


def main(argv):
    data = sys.stdin.buffer.read(LIMIT + 1)  # all of it: libvirt writes it whatever we decide
    if len(argv) < 3 or (argv[1], argv[2]) not in CHECKED:
        return 0
    name = argv[0]
    found = re.search(rb"<uuid>([0-9a-fA-F-]{{36}})</uuid>", data)
    recorded = found is not None and os.path.lexists(
        os.path.join(RECORDS, found.group(1).decode().lower() + ".json"))
    if not recorded and found is not None and b"tdx" not in data.lower():
        return 0  # neither recorded nor a TD: an ordinary VM never loads tdxvirt
    if len(data) > LIMIT:
        return refuse(f"the definition of {{name!r}} is larger than tdxvirt's hook reads")
    os.environ.update(ENVIRONMENT)
    try:
        if CODE:
            sys.path.insert(0, CODE)
        from tdxvirt.domain.record import RecordStore
        from tdxvirt.enforce.hook import decide
    except Exception as error:  # noqa: BLE001 (any failure to load refuses a TD)
        return refuse(f"{{name!r}} was not started: tdxvirt's hook cannot load tdxvirt "
                      f"({{type(error).__name__}}: {{error}}); reinstall tdxvirt, then run "
                      "`tdxvirt host setup`")
    try:
        message = decide(name, argv[1], argv[2], data, RecordStore(RECORDS))
    except Exception as error:  # noqa: BLE001
        return refuse(f"{{name!r}} was not started: tdxvirt's check failed "
                      f"({{type(error).__name__}}: {{error}})")
    return refuse(message) if message else 0


def refuse(message):
    line = " ".join(str(message).split())
    print(line if line.startswith("tdxvirt:") else "tdxvirt: " + line, file=sys.stderr)
    return 1


sys.exit(main(sys.argv[1:]))
'''


def script(records: str, *, interpreter: str | None = None, code: str | None = None,
           environment: dict[str, str] | None = None) -> bytes:
    """The hook file: ``records``, the record directory as the daemon sees it;
    ``interpreter``, a Python with tdxvirt's dependencies (default: the one running
    tdxvirt now); ``code``, a directory holding the ``tdxvirt`` package when that
    Python does not have it installed (the simulated host's root); ``environment``,
    variables NVIDIA's tool needs there (the simulated host's stand-in)."""
    return _SCRIPT.format(interpreter=interpreter or sys.executable, records=str(records),
                          code=code, environment=dict(environment or {}),
                          limit=STDIN_LIMIT).encode()
