"""Where a model's own code fixes the batch size: the file and line that made ``torch.export``
specialise the batch dimension of a dynamic-batch capture.

torch's shape environment logs every guard it adds (``eval Eq(s0, 2) [guard added]``) while the
model's code runs under tracing; the Python stack at that moment ends in the line of the model
that asked. Capture only calls this after a capture failed on a fixed batch, re-running it with
that log on, so a successful export pays nothing.
"""

from __future__ import annotations

import logging
import re
import sysconfig
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

_SHAPES_LOGGER = "torch.fx.experimental.symbolic_shapes"
# Frames in these folders are never the model's code: torch, bnfold, the standard library, sympy.
_NOT_USER_CODE = tuple(
    str(Path(p).resolve())
    for p in (
        Path(torch.__file__).parent,
        Path(__file__).parent.parent,
        sysconfig.get_paths()["stdlib"],
        Path(__import__("sympy").__file__).parent,
    )
)


def _user_frame(stack: traceback.StackSummary) -> traceback.FrameSummary | None:
    """The innermost frame of ``stack`` in the model's own code."""
    for frame in reversed(stack):
        if not str(Path(frame.filename).resolve()).startswith(_NOT_USER_CODE):
            return frame
    return None


class _GuardRecorder(logging.Handler):
    """Records the model's line for every guard that involves a batch symbol."""

    def __init__(self, depth: int) -> None:
        super().__init__(logging.INFO)
        self.depth = depth
        """Frames up to this depth are the caller's: only deeper ones run under the capture."""
        self.batch_symbols: set[str] = set()
        self.sites: list[traceback.FrameSummary] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        created = re.match(r"create_symbol (\w+) = .* for \S*\.size\(\)\[0\]", message)
        if created:
            self.batch_symbols.add(created.group(1))
            return
        guard = "[guard added]" in message or message.startswith("set_replacement")
        if guard and any(re.search(rf"\b{s}\b", message) for s in self.batch_symbols):
            frame = _user_frame(traceback.extract_stack()[self.depth :])
            if frame is not None:
                self.sites.append(frame)


def batch_fixing_line(capture: Callable[[], object]) -> str | None:
    """``file:line (`code`)`` of the model's code that fixed the batch, found by running
    ``capture`` (a dynamic-batch ``torch.export`` call expected to fail) with torch's guard log
    on; ``None`` when no line of the model's own code is involved."""
    logger = logging.getLogger(_SHAPES_LOGGER)
    recorder = _GuardRecorder(depth=len(traceback.extract_stack()))
    saved = logger.handlers, logger.level, logger.propagate
    logger.handlers, logger.propagate = [recorder], False  # recorded, never printed
    logger.setLevel(logging.INFO)
    try:
        capture()
    except Exception:  # the failure is expected: only the guards' sites matter here
        pass
    finally:
        logger.handlers, logger.propagate = saved[0], saved[2]
        logger.setLevel(saved[1])
    if not recorder.sites:
        return None
    frame = recorder.sites[0]
    code = (frame.line or "").strip()
    return f"{frame.filename}:{frame.lineno}" + (f" (`{code}`)" if code else "")
