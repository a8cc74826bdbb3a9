"""SIGTERM as Ctrl-C for the commands that run until stopped or that Ray starts: a
``KeyboardInterrupt`` in the main thread, so the same clean-up and exit code 130 follow."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Meanwhile SIGTERM raises ``KeyboardInterrupt``; the previous handler comes back after."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
