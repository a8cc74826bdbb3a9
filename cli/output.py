"""Files the commands write besides the model: JSON reports."""

from __future__ import annotations

import json
import os
from typing import Any

from bnfold.staging import atomic_write


def write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Write ``data`` as JSON atomically (temp file beside it, then rename); the callers check
    ``path`` before their slow work, naming their option."""
    text = json.dumps(data, indent=2).encode()
    atomic_write(path, lambda fh: fh.write(text))
