"""Reading user data (``.npy``/``.npz``) and matching its arrays to model inputs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import UsageError

# For a single-input model, arrays with these names are taken as its input.
INPUT_KEYS = ("x", "input", "inputs", "data")

ArraysArg = str | os.PathLike[str] | np.ndarray | Mapping[str, np.ndarray]


def read_arrays(source: ArraysArg, label: str) -> dict[str, np.ndarray]:
    """Named arrays from a ``.npy``/``.npz`` path, an array (named ``""``) or a mapping.

    ``label`` names the source in errors: library callers pass their parameter in backticks
    (``"`inputs`"``), which the CLI maps to its flag. Pickled object arrays are refused: they
    could run code.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise UsageError(f"{label} {path}: file does not exist")
        return load_arrays(path, f"{label} {path}")
    if isinstance(source, np.ndarray):
        return {"": source}
    return dict(source)


def load_arrays(file: str | os.PathLike[str] | BinaryIO, label: str) -> dict[str, np.ndarray]:
    """The named arrays of a ``.npy``/``.npz`` file (a path or an open, seekable binary file);
    a ``.npy`` array is named ``""``. Errors start with ``label``; pickled object arrays are refused."""
    try:
        loaded = np.load(file, allow_pickle=False)
        return dict(loaded.items()) if isinstance(loaded, np.lib.npyio.NpzFile) else {"": loaded}
    except Exception as exc:
        raise UsageError(f"{label}: not a readable .npy/.npz file ({type(exc).__name__}: {exc})") from exc


def select_inputs(arrays: Mapping[str, np.ndarray], names: Sequence[str], label: str) -> list[np.ndarray]:
    """One float array per model input, in ``names`` order, all with the same number of samples;
    errors start with ``label`` (see :func:`read_arrays`).

    A single-input model takes the array named after its input, else one named like
    :data:`INPUT_KEYS`, else the only array; several inputs need one array per input name.
    """
    if len(names) == 1:
        found = next((arrays[k] for k in (names[0], *INPUT_KEYS) if k in arrays), None)
        if found is None and len(arrays) == 1:
            found = next(iter(arrays.values()))
        if found is None:
            raise UsageError(f"{label}: no array named '{names[0]}' (the model input); it has {sorted(arrays)}")
        selected = [found]
    else:
        missing = [n for n in names if n not in arrays]
        if missing:
            raise UsageError(f"{label}: no array for model input(s) {missing}; it has {sorted(arrays)}")
        selected = [arrays[n] for n in names]
    for name, array in zip(names, selected):
        if array.dtype.kind != "f":
            raise UsageError(f"{label}: array for input '{name}' has dtype {array.dtype}; expected floats")
        if array.ndim == 0:
            raise UsageError(f"{label}: array for input '{name}' is a scalar; expected a batch of samples")
    if len({a.shape[0] for a in selected}) != 1:
        raise UsageError(f"{label}: arrays have different numbers of samples")
    if selected[0].shape[0] == 0:
        raise UsageError(f"{label}: the arrays hold no samples")
    return selected
