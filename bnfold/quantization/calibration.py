"""The user's data for INT8 quantization: read it (``.npy``/``.npz`` or a folder of images read
with the model's preprocessing), split it into calibration samples and held-out samples, and feed
the calibration samples to ONNX Runtime's calibrator in batches."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from ..arrays import ArraysArg
from ..batching import plan_batches
from ..errors import Param, UsageError
from ..images import IMAGE_SUFFIXES, load_images
from ..inputs import IMAGES, file_kind, folder_files
from ..metadata import Preprocess
from ..predictor import TensorSpec
from ..reference import load_inputs

# Without `calibration_samples`: half the data calibrates, at most this many samples (ONNX
# Runtime's calibrators converge within a few hundred; the rest verifies).
DEFAULT_CALIBRATION_CAP = 256
# The INT8 check needs at least this many held-out samples to say anything about agreement.
MIN_HELD_OUT = 20
# The split is a seeded shuffle, so data sorted by class is split evenly, and the same every run.
SPLIT_SEED = 0
# Samples per calibration run of ONNX Runtime (a static batch axis takes its own size).
CALIBRATION_BATCH = 16


@dataclass(frozen=True)
class SplitData:
    """The user's data split in two: samples that calibrate and samples that verify."""

    calibration: dict[str, np.ndarray]
    held_out: dict[str, np.ndarray]
    source: str
    """What the data is (a path, or "given arrays")."""
    split: str
    """How it was split, for the report."""

    @property
    def calibration_samples(self) -> int:
        return len(next(iter(self.calibration.values())))

    @property
    def held_out_samples(self) -> int:
        return len(next(iter(self.held_out.values())))


def read_calibration(
    source: ArraysArg, specs: Sequence[TensorSpec], preprocess: Preprocess | None
) -> dict[str, np.ndarray]:
    """Arrays for every model input: from a ``.npy``/``.npz`` path, an array or arrays by input
    name (shape- and dtype-checked against ``specs``), or from a folder of images read with
    ``preprocess`` (single-input image models). Errors name ``calibration``."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        return {specs[0].name: _read_images(Path(source), specs, preprocess)}
    return load_inputs(source, specs, parameter="calibration")


def _read_images(folder: Path, specs: Sequence[TensorSpec], preprocess: Preprocess | None) -> np.ndarray:
    if preprocess is None or len(specs) != 1:
        raise UsageError(
            Param("calibration"),
            f" {folder}: a folder of images needs a single-input model with image preprocessing (the model "
            "file carries none: set ",
            Param("preprocess.size"),
            ", ",
            Param("preprocess.mean"),
            " and ",
            Param("preprocess.std"),
            "), or give .npy/.npz data",
        )
    try:  # a folder is read as everywhere else: any depth, hidden names skipped, one kind
        files = folder_files(folder)
    except UsageError as exc:
        raise UsageError(Param("calibration"), " ", *exc.parts) from exc
    if file_kind(files[0]) != IMAGES:
        raise UsageError(
            Param("calibration"), f" {folder}: holds no image files ({', '.join(IMAGE_SUFFIXES)}) but {files[0].name}"
        )
    images = load_images(files, preprocess)
    spec = specs[0]
    if not spec.fits(images.shape):
        raise UsageError(
            Param("calibration"),
            f" {folder}: the preprocessing gives images of shape {images.shape[1:]}; the model takes {spec.shape}",
        )
    return images


def split_data(
    source: ArraysArg,
    specs: Sequence[TensorSpec],
    preprocess: Preprocess | None,
    calibration_samples: int | None,
) -> SplitData:
    """The data of ``source`` split by :func:`split_indices`."""
    arrays = read_calibration(source, specs, preprocess)
    samples = len(next(iter(arrays.values())))
    label = str(source) if isinstance(source, (str, os.PathLike)) else "given arrays"
    calibrate, held_out = split_indices(samples, calibration_samples, label)
    return SplitData(
        calibration={name: a[calibrate] for name, a in arrays.items()},
        held_out={name: a[held_out] for name, a in arrays.items()},
        source=label,
        split=f"seeded shuffle (seed {SPLIT_SEED}): {len(calibrate)} sample(s) calibrate, the other "
        f"{len(held_out)} verify",
    )


def split_indices(
    samples: int, calibration_samples: int | None, label: str = "the data"
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices of the calibration samples and of the held-out samples: a seeded
    shuffle's first ``calibration_samples`` (default: half the data, at most
    :data:`DEFAULT_CALIBRATION_CAP`) and all the others, of which there must be at least
    :data:`MIN_HELD_OUT`."""
    count = min(samples // 2, DEFAULT_CALIBRATION_CAP) if calibration_samples is None else calibration_samples
    if count < 1 or samples - count < MIN_HELD_OUT:
        if calibration_samples is None:
            raise UsageError(
                Param("calibration"),
                f" {label}: {samples} sample(s) are too few to split into calibration samples and at least "
                f"{MIN_HELD_OUT} held out for the INT8 check; give at least {2 * MIN_HELD_OUT - 1} samples",
            )
        raise UsageError(
            Param("calibration_samples"),
            f" {calibration_samples}: {label} has {samples} sample(s), which leaves fewer than {MIN_HELD_OUT} "
            f"held out for the INT8 check; use at most {samples - MIN_HELD_OUT} for calibration",
        )
    order = np.random.default_rng(SPLIT_SEED).permutation(samples)
    return np.sort(order[:count]), np.sort(order[count:])


class BatchReader(CalibrationDataReader):
    """ONNX Runtime's calibration reader over arrays by input name: batches of
    :data:`CALIBRATION_BATCH` samples, or of the static batch size, all of one size (ONNX
    Runtime's histogram calibrators stack them): the last one is padded with copies of its last
    sample, which moves no min/max range and adds at most ``size - 1`` repeated samples to a
    histogram."""

    def __init__(self, arrays: dict[str, np.ndarray], static_batch: int | None) -> None:
        self.arrays = {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in arrays.items()}
        samples = len(next(iter(arrays.values())))
        size = static_batch or min(samples, CALIBRATION_BATCH)
        self.plan = plan_batches(samples, size, pad_last=True)
        self.batches: Iterator[dict[str, np.ndarray]] = (batch.take(self.arrays) for batch in self.plan)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)
