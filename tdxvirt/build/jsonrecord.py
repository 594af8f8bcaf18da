"""One JSON file of tdxvirt's build state (the artifacts record, the install record):
read whole into a dict, written whole by renaming a temporary file into place, so a
reader never sees half a record."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..errors import InputError


def load(file: str | Path, what: str, remedy: str) -> dict:
    """The record ({} when there is none yet); ``what`` names it and ``remedy`` says what
    to do in the one-line error for an unreadable one."""
    try:
        data = json.loads(Path(file).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise InputError(f"{what} {file} is unreadable ({error}); {remedy}") from None
    if not isinstance(data, dict):
        raise InputError(f"{what} {file} is not a JSON object; {remedy}")
    return data


def save(file: str | Path, data: dict) -> None:
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=file.parent, prefix=f".{file.stem}.")
    with os.fdopen(handle, "w") as out:
        json.dump(data, out, indent=2, sort_keys=True)
        out.write("\n")
    os.replace(temporary, file)
