"""Input shapes written as text (``1x3x224x224``), apart from :mod:`bnfold.loading` so that the
CLI can parse them without importing torch."""

from __future__ import annotations

import re

from .errors import Param, UsageError

Shape = tuple[int, ...]


def parse_shape(text: str, parameter: str = "input_shapes", example: str = "1x3x224x224") -> Shape:
    """Parse ``"1x3x224x224"`` into ``(1, 3, 224, 224)``; a :class:`UsageError` naming the
    Python ``parameter`` the text is for if malformed."""
    if not re.fullmatch(r"\s*[1-9]\d*(\s*[xX,]\s*[1-9]\d*)*\s*", text or ""):
        raise UsageError(
            Param(parameter), f" {text!r} is not valid: give positive sizes separated by 'x', e.g. {example}"
        )
    return tuple(int(p) for p in re.split(r"[xX,]", text))
