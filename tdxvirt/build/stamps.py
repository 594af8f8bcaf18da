"""Stamps: a step is done when its stamp holds the key of its current inputs.

A key is the SHA-256 of the step's inputs (source revision, patch file hashes,
config, flags) together with the key of the step before it in the same component,
so a changed input redoes its step and every later one. A stamp also keeps what the
step found out (the fetched revision, the kernel release) for the steps after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def step_key(step_id: str, inputs: dict, previous: str | None) -> str:
    material = json.dumps({"step": step_id, "inputs": inputs, "previous": previous},
                          sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(material.encode()).hexdigest()


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Stamp:
    key: str
    inputs: dict
    results: dict
    finished: str


class StampStore:
    """One JSON file per step under ``<workdir>/stamps``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def _file(self, step_id: str) -> Path:
        return self.directory / f"{step_id}.json"

    def load(self, step_id: str) -> Stamp | None:
        try:
            data = json.loads(self._file(step_id).read_text())
            return Stamp(key=data["key"], inputs=data["inputs"], results=data["results"],
                         finished=data["finished"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # missing or damaged: the step is simply not done

    def results(self, step_id: str) -> dict:
        stamp = self.load(step_id)
        return stamp.results if stamp else {}

    def record(self, step_id: str, key: str, inputs: dict, results: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        data = {"key": key, "inputs": inputs, "results": results,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        # written atomically: a half-written stamp must never read as done
        handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=f".{step_id}.")
        with os.fdopen(handle, "w") as file:
            json.dump(data, file, indent=2, sort_keys=True)
        os.replace(temporary, self._file(step_id))

    def clear(self, step_id: str) -> None:
        self._file(step_id).unlink(missing_ok=True)
