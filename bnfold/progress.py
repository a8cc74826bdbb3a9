"""Progress for long steps: shown on a terminal, silent when piped or used as a library."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Reports named steps and counted work; the base class reports nothing."""

    def start(self, step: str) -> None:
        """A step begins (e.g. ``"Exporting to ONNX"``)."""

    def advance(self, done: int, total: int) -> None:
        """``done`` of ``total`` units of the current step are finished."""

    def finish(self) -> None:
        """The current step is finished."""


class TerminalProgress(Progress):
    """Writes ``step... done (1.2 s)`` lines, redrawing counters in place, to a terminal stream."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.step = ""
        self.t0 = 0.0

    def start(self, step: str) -> None:
        self.step, self.t0 = step, time.perf_counter()
        self.stream.write(f"{step}...")
        self.stream.flush()

    def advance(self, done: int, total: int) -> None:
        self.stream.write(f"\r\033[K{self.step}... {done}/{total}")
        self.stream.flush()

    def finish(self) -> None:
        self.stream.write(f"\r\033[K{self.step}... done ({time.perf_counter() - self.t0:.1f} s)\n")
        self.stream.flush()


def for_stream(stream: TextIO) -> Progress:
    """A :class:`TerminalProgress` when ``stream`` is a terminal, else a silent :class:`Progress`."""
    return TerminalProgress(stream) if stream.isatty() else Progress()
