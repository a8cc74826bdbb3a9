"""The one place where the library's parameter names become the CLI's flags.

Library errors write a parameter, or a call that would fix the problem, in backticks
(`` `rtol` must be non-negative``); :func:`cli_message` replaces each such name by the flag that
sets it, so the library never names a flag and the CLI never re-words the library's checks.
"""

from __future__ import annotations

import re

# Library parameter (or `name=value` suggestion) -> the flag that sets it.
PARAMETER_FLAGS: dict[str, str] = {
    # export and verify
    "path": "-o",
    "rtol": "--rtol",
    "atol": "--atol",
    "inputs": "--inputs",
    "reference": "--reference",
    'reference="float64"': "--reference float64",
    "opset": "--opset",
    "fp16=True": "--fp16",
    "keep_io_types=True": "--keep-io-types",
    "verify=False": "--no-verify",
    "labels": "--labels",
    "preprocess.channel_order": "--preprocess-channels",
}

_CODE = re.compile(r"`([^`]+)`")


def cli_message(message: str) -> str:
    """``message`` with every backticked library parameter replaced by its flag; other
    backticked code keeps its backticks."""
    return _CODE.sub(lambda m: PARAMETER_FLAGS.get(m.group(1), m.group(0)), message)
