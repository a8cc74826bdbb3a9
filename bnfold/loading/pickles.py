"""``torch.save`` files read safely: ``weights_only`` with a short allow-list of plain data types,
a full unpickler only for a file the user trusts, and a refusal that names what the file wants."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import pickle
import re
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelLoadError, Param, UnsafeModelError, first_line
from .pickle_scan import pickle_globals
from .usercode import cwd_importable

# numpy dtype character codes of plain data: bool, signed/unsigned ints, floats, complex, str, bytes.
_DATA_DTYPE_CODES = "?bBhHiIlLqQefdgFDGUS"
# The legacy (non-zip) torch.save format is five pickles in a row.
LEGACY_PICKLES = 5


def _numpy_multiarray() -> Any:
    """numpy's ``multiarray`` module (``numpy._core`` in numpy 2, ``numpy.core`` before)."""
    for name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        with contextlib.suppress(ImportError), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    raise ImportError("numpy has no multiarray module")  # pragma: no cover


def safe_globals() -> list[Any]:
    """What ``torch.load(weights_only=True)`` may import beyond torch's own allow-list.

    Only plain data containers that checkpoints commonly hold: numpy scalars, arrays and dtypes of
    booleans, numbers, strings and bytes, and ``argparse.Namespace`` (training arguments). Building
    them runs no code from the file. numpy's module was renamed (``numpy.core`` ->
    ``numpy._core``); both spellings are accepted so checkpoints from either numpy load.
    """
    multiarray = _numpy_multiarray()
    allowed: list[Any] = [np.dtype, np.ndarray, multiarray.scalar, multiarray._reconstruct, argparse.Namespace]
    for code in _DATA_DTYPE_CODES:
        if type(np.dtype(code)) not in allowed:
            allowed.append(type(np.dtype(code)))
    for old in ("numpy.core.multiarray", "numpy._core.multiarray"):
        if old != multiarray.__name__:
            allowed += [(multiarray.scalar, f"{old}.scalar"), (multiarray._reconstruct, f"{old}._reconstruct")]
    return allowed


def allowed_global_names() -> set[str]:
    """``module.name`` of every global a safe load may import: torch's allow-list plus :func:`safe_globals`.

    torch has no public API for its default allow-list; this reads it where
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` does.
    """
    names = set(torch._weights_only_unpickler._get_allowed_globals())
    for item in safe_globals():
        obj, name = item if isinstance(item, tuple) else (item, None)
        names.add(name or f"{obj.__module__}.{obj.__qualname__}")
    return names


def unsafe_globals(path: Path) -> list[str]:
    """The globals a ``torch.save`` file imports that a safe load does not allow, sorted.

    A zip checkpoint is read by ``torch.serialization.get_unsafe_globals_in_checkpoint``, which
    reads the same ``data.pkl`` as ``torch.load``. Where that cannot (a legacy non-zip file, or a
    pickle with opcodes torch's scanner does not parse, such as protocol 4's), the opcode scan of
    :func:`~bnfold.loading.pickle_scan.pickle_globals` reads the pickles instead.
    """
    try:
        if zipfile.is_zipfile(path):
            # torch's scanner raises many types on what it cannot parse; the opcode scan takes over.
            with contextlib.suppress(Exception), torch.serialization.safe_globals(safe_globals()):
                return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
            with zipfile.ZipFile(path) as archive:
                wanted: set[str] = set()
                for member in (n for n in archive.namelist() if n.endswith("data.pkl")):
                    with archive.open(member) as fh:
                        wanted |= pickle_globals(fh)
        else:
            with open(path, "rb") as fh:
                wanted = pickle_globals(fh, max_pickles=LEGACY_PICKLES)
    except (OSError, zipfile.BadZipFile, ValueError):
        return []
    return sorted(wanted - allowed_global_names())


def list_names(names: Sequence[str], limit: int = 8) -> str:
    """``a, b, c and 5 more``: the first ``limit`` of ``names`` and how many were left out."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _refusal_reason(exc: BaseException) -> str:
    """The informative line of torch's weights_only error (it wraps it in paragraphs of advice)."""
    text = str(exc)
    match = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text) or re.search(
        r"(Unsupported [^\n]+|Trying to load [^\n]+)", text
    )
    line = match.group(1) if match else next((x for x in text.splitlines() if x.strip()), type(exc).__name__)
    return line.strip().rstrip(".")


def _refusal(path: Path, exc: BaseException) -> ModelLoadError:
    """Why the safe load refused ``path``: the globals it wants, or the pickle feature it needs."""
    wanted = unsafe_globals(path)
    if wanted:
        return UnsafeModelError(
            f"{path} is a pickled Python object that would import {list_names(wanted)}; "
            "unpickling it can run any code. If you trust this file, pass ",
            Param("trust_pickle", True),
            "; better, save a state_dict and pass ",
            Param("arch"),
            ", or save with torch.jit.save / torch.export.save",
        )
    return ModelLoadError(
        f"{path} cannot be read safely ({_refusal_reason(exc)}): it is damaged, or it needs a full "
        "unpickler. Re-save or re-download it (torch.save(model.state_dict())), or, only if you "
        "trust the file, pass ",
        Param("trust_pickle", True),
    )


def load_pickled(path: Path, trust_pickle: bool) -> Any:
    """Unpickle a ``torch.save`` file: ``weights_only`` with :func:`safe_globals`, or fully if trusted."""
    try:
        with torch.serialization.safe_globals(safe_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise _refusal(path, exc) from exc
    except Exception as exc:
        raise ModelLoadError(
            f"{path} is not a readable PyTorch checkpoint: {type(exc).__name__}: {first_line(exc)}"
        ) from exc
    try:
        with cwd_importable(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: unpickling the trusted file failed: {type(exc).__name__}: {first_line(exc)}"
        ) from exc
