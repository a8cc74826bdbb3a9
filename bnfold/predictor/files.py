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
from ..batching import plan_batches
from ..errors import Param, UsageError
from ..images import group_by_size, load_images
from ..inputs import IMAGES, TABLES, local_inputs, one_kind
from ..metadata import Preprocess
from ..progress import Progress
from .runner import Predictor

DATA = Param("data")


@dataclass
class FilePredictions:
    """One row per sample: ``names[i]`` (the image's path, the row's index in a single array
    file, or ``file:row`` for several) and ``outputs[name][i]``, for every model output. An output
    whose samples differ in shape (a dynamic-size model's segmentation of images of several sizes)
    is a list of one array per sample instead of one array."""

    names: list[str]
    outputs: dict[str, np.ndarray | list[np.ndarray]]


def predict_files(
    predictor: Predictor, data: Sequence[str | os.PathLike[str]], *, progress: Progress | None = None
) -> FilePredictions:
    """Run ``predictor`` on ``data``: image files, or ``.npy``/``.npz`` files (one array per model
    input), given as files or folders, one kind per call, in batches of the predictor's batch size.
    Images are read with the model's stored preprocessing. A dynamic-size model takes samples of
    every size it allows, run in batches of one size (never padded). A :class:`UsageError` (naming
    ``data``) for a mix of kinds, parquet tables (read on Ray), or arrays of unequal sample shapes
    (for a model of fixed size)."""
    names, groups = _source(predictor, local_inputs(data))
    progress = progress or Progress()
    plan = [
        (group, batch.rows)
        for group in groups
        for batch in plan_batches(len(group.rows), predictor.batch_size or len(group.rows))
    ]
    progress.start(f"Predicting {len(names)} sample(s) on {predictor.device}")
    parts: list[dict[str, np.ndarray]] = []
    for done, (group, rows) in enumerate(plan):
        result = group.predict(rows)
        parts.append(result if isinstance(result, dict) else {predictor.outputs[0].name: result})
        progress.advance(done + 1, len(plan))
    progress.finish()
    return FilePredictions(names, _in_order(parts, [i for group, rows in plan for i in group.rows[rows]]))


@dataclass(frozen=True)
class _Group:
    """Samples of one shape: their indices among all samples, and the predictions for a slice of them."""

    rows: list[int]
    predict: Callable[[slice], Any]


def _in_order(parts: list[dict[str, np.ndarray]], order: list[int]) -> dict[str, np.ndarray | list[np.ndarray]]:
    """Each output of the batches ``parts`` (their samples in the order ``order``) in the samples'
    own order: one array, or a list of one array per sample when their shapes differ."""
    inverse = np.argsort(np.asarray(order, dtype=np.int64))
    outputs: dict[str, np.ndarray | list[np.ndarray]] = {}
    for name in parts[0]:
        pieces = [part[name] for part in parts]
        if len({piece.shape[1:] for piece in pieces}) == 1:
            outputs[name] = np.concatenate(pieces)[inverse]
        else:
            samples = [row for piece in pieces for row in piece]
            outputs[name] = [samples[i] for i in inverse]
    return outputs


def _source(predictor: Predictor, files: list[Path]) -> tuple[list[str], list[_Group]]:
    """(sample names, the samples in groups of one shape)."""
    kind = one_kind(files, DATA)
    if kind == TABLES:
        raise UsageError(
            DATA, ": parquet files are read on Ray Data (bnfold predict --ray, or bnfold.on_ray.predict_dataset)"
        )
    if kind == IMAGES:
        preprocess = predictor.image_preprocessing()
        groups = group_by_size(files, preprocess)
        return [str(p) for p in files], [
            _image_group(predictor, preprocess, [files[i] for i in rows], rows) for rows in groups
        ]
    input_names = [s.name for s in predictor.inputs]
    per_file = [select_inputs(read_arrays(file, DATA), input_names, (DATA, f" {file}")) for file in files]
    by_shape: dict[tuple[tuple[int, ...], ...], list[int]] = {}  # sample shapes -> files
    for i, arrays in enumerate(per_file):
        by_shape.setdefault(tuple(a.shape[1:] for a in arrays), []).append(i)
    if len(by_shape) > 1 and not predictor.image_sizes:  # only a dynamic-size model takes several
        (first, a), (second, b) = [(shape, files[found[0]]) for shape, found in list(by_shape.items())[:2]]
        name = next(n for n, x, y in zip(input_names, first, second) if x != y)
        raise UsageError(
            DATA,
            f": samples of input '{name}' have shape {first[input_names.index(name)]} in {a} but "
            f"{second[input_names.index(name)]} in {b}; predict files of one shape at a time",
        )
    counts = [arrays[0].shape[0] for arrays in per_file]
    starts = np.cumsum([0, *counts]).tolist()
    groups = []
    for found in by_shape.values():
        rows = [row for i in found for row in range(starts[i], starts[i + 1])]
        feeds = {name: np.concatenate([per_file[i][k] for i in found]) for k, name in enumerate(input_names)}
        groups.append(_Group(rows, lambda part, feeds=feeds: predictor.predict({n: a[part] for n, a in feeds.items()})))
    if len(files) == 1:
        names = [str(i) for i in range(counts[0])]
    else:
        names = [f"{file}:{i}" for file, count in zip(files, counts) for i in range(count)]
    return names, groups


def _image_group(predictor: Predictor, preprocess: Preprocess, paths: list[Path], rows: list[int]) -> _Group:
    """Images that come out of ``preprocess`` at one size (already grouped: read once, not sized again)."""
    return _Group(rows, lambda part: predictor.predict(load_images(paths[part], preprocess)))
