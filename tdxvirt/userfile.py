"""Reading a file the user named on the command line, with one clear error if not."""

from __future__ import annotations

from pathlib import Path

from .errors import InputError, NotFoundError


def read_user_file(path: str | Path, what: str, hint: str = "") -> bytes:
    """The file's bytes, or an error naming ``what`` it was meant to be and ``hint``."""
    path = Path(path)
    fix = f"; {hint}" if hint else ""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"{what} {path} does not exist{fix}") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a directory{fix}") from None
    except OSError as error:
        raise InputError(f"cannot read {what} {path}: {error.strerror}") from None
