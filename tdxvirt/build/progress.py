"""Progress for people: step n of m, elapsed time, the tail of the step's log.

On a terminal one live line is redrawn; elsewhere (CI logs, pipes) a line is
printed when a step starts and ends, and a heartbeat line every ``heartbeat``
seconds while it runs.
"""

from __future__ import annotations

import os
import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ConsoleReporter:
    """Progress for people: a live line on a terminal, a heartbeat line elsewhere."""

    def __init__(self, stream=None, live: bool | None = None, heartbeat: float = 60.0):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.heartbeat = heartbeat
        self._last_beat = 0.0
        self._live_shown = False

    def _say(self, text: str) -> None:
        if self._live_shown:
            self.stream.write("\r\033[K")
            self._live_shown = False
        self.stream.write(text + "\n")
        self.stream.flush()

    @staticmethod
    def _head(number: int, total: int, step) -> str:
        return f"[{number}/{total}] {step.label}"

    def step_skipped(self, number, total, step) -> None:
        self._say(f"{self._head(number, total, step)}: up to date")

    def step_started(self, number, total, step, log_path) -> None:
        self._last_beat = time.monotonic()
        self._say(f"{self._head(number, total, step)}: running (log: {log_path})")

    def step_progress(self, number, total, step, elapsed, line) -> None:
        if self.live:
            width = 120
            try:
                width = os.get_terminal_size(self.stream.fileno()).columns
            except (OSError, ValueError):
                pass
            text = f"{self._head(number, total, step)} {_clock(elapsed)} | {line.strip()}"
            self.stream.write("\r\033[K" + text[:max(width - 1, 20)])
            self.stream.flush()
            self._live_shown = True
        elif time.monotonic() - self._last_beat >= self.heartbeat:
            self._last_beat = time.monotonic()
            self._say(f"{self._head(number, total, step)}: {_clock(elapsed)} | {line.strip()[:160]}")

    def step_finished(self, number, total, step, elapsed) -> None:
        self._say(f"{self._head(number, total, step)}: done in {_clock(elapsed)}")

    def step_failed(self, number, total, step, elapsed, log_path, tail) -> None:
        self._say(f"{self._head(number, total, step)}: FAILED after {_clock(elapsed)}; "
                  f"last lines of {log_path}:")
        for line in tail:
            self._say(f"    {line}")

    def finished(self, summary) -> None:
        if not summary.executed:
            self._say(f"Nothing to do: all {len(summary.skipped)} steps are up to date")
        else:
            self._say(f"Ran {len(summary.executed)} step(s), {len(summary.skipped)} up to date")
