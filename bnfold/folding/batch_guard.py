"""Where a model's own code fixes the batch size: the file and line that made ``torch.export``
specialise the batch dimension of a dynamic-batch capture.

Capture only calls this after a capture failed on a fixed batch, re-running it with torch's guard
log recorded (:class:`~bnfold.folding.guard_log.GuardLog`), so a successful export pays nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from .guard_log import GuardLog


def batch_fixing_line(capture: Callable[[], object]) -> str | None:
    """``file:line (`code`)`` of the model's code that fixed the batch, found by running
    ``capture`` (a dynamic-batch ``torch.export`` call expected to fail) with torch's guard log
    on; ``None`` when no line of the model's own code is involved."""
    with GuardLog() as log, contextlib.suppress(Exception):  # the failure is expected: only the sites matter
        capture()
    lines = [site.line() for site in log.sites_of(log.symbols_of(0))]
    return next((line for line in lines if line), None)
