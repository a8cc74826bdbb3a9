"""Predictions over files on this machine: image files, or the samples of ``.npy``/``.npz`` files,
named and read as ``bnfold predict --ray`` reads them (:mod:`bnfold.inputs`), run in batches by a
:class:`Predictor`. ``bnfold predict`` without ``--ray`` is this; with ``--ray`` it is
:func:`bnfold.on_ray.predict_dataset`, the same over many machines."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..arrays import read_arrays, select_inputs
from ..batching import Batch, plan_batches
from ..errors import Param, UsageError
from ..inputs import IMAGES, TABLES, local_inputs, one_kind
from ..progress import Progress
from .runner import Predictor

DATA = Param("data")


@dataclass
class FilePredictions:
    """One row per sample: ``names[i]`` (the image's path, the row's index in a single array
    file, or ``file:row`` for several) and ``outputs[name][i]``, for every model output."""

    names: list[str]
    outputs: dict[str, np.ndarray]


def predict_files(
    predictor: Predictor, data: Sequence[str | os.PathLike[str]], *, progress: Progress | None = None
) -> FilePredictions:
    """Run ``predictor`` on ``data``: image files, or ``.npy``/``.npz`` files (one array per model
    input), given as files or folders, one kind per call, in batches of the predictor's batch size.
    Images are read with the model's stored preprocessing. A :class:`UsageError` (naming ``data``)
    for a mix of kinds, parquet tables (read on Ray), or arrays of unequal sample shapes."""
    names, predict_batch = _source(predictor, local_inputs(data))
    progress = progress or Progress()
    plan = plan_batches(len(names), predictor.batch_size or len(names))
    progress.start(f"Predicting {len(names)} sample(s) on {predictor.device}")
    parts: list[dict[str, np.ndarray]] = []
    for batch in plan:
        result = predict_batch(batch)
        parts.append(result if isinstance(result, dict) else {predictor.outputs[0].name: result})
        progress.advance(batch.rows.stop, len(names))
    progress.finish()
    return FilePredictions(names, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


def _source(predictor: Predictor, files: list[Path]) -> tuple[list[str], Callable[[Batch], Any]]:
    """(sample names, the predictions for a batch of them)."""
    kind = one_kind(files, DATA)
    if kind == TABLES:
        raise UsageError(
            DATA, ": parquet files are read on Ray Data (bnfold predict --ray, or bnfold.on_ray.predict_dataset)"
        )
    if kind == IMAGES:
        return [str(p) for p in files], lambda batch: predictor.predict_images(files[batch.rows])
    input_names = [s.name for s in predictor.inputs]
    per_file = [select_inputs(read_arrays(file, DATA), input_names, (DATA, f" {file}")) for file in files]
    for name, arrays in zip(input_names, zip(*per_file)):
        shapes = {a.shape[1:]: file for a, file in zip(arrays, files)}
        if len(shapes) > 1:
            (first, a), (second, b) = list(shapes.items())[:2]
            raise UsageError(
                DATA,
                f": samples of input '{name}' have shape {first} in {a} but {second} in {b}; "
                "predict files of one shape at a time",
            )
    named = {name: np.concatenate(arrays) for name, arrays in zip(input_names, zip(*per_file))}
    if len(files) == 1:
        names = [str(i) for i in range(per_file[0][0].shape[0])]
    else:
        names = [f"{file}:{i}" for file, arrays in zip(files, per_file) for i in range(arrays[0].shape[0])]
    return names, lambda batch: predictor.predict(batch.take(named))
