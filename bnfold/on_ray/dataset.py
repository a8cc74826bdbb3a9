"""Batch inference on Ray Data: :func:`predict_dataset` turns inputs into a Dataset of prediction
rows (see :mod:`bnfold.on_ray.rows`), predicted by a pool of :class:`PredictionActor` s;
:func:`write_predictions` writes them to parquet and counts them.

Whatever would fail every row (a model that cannot be loaded, inputs of the wrong shape, images
for a model without preprocessing metadata, resources the cluster does not have) fails before the
job starts, with the same errors as :class:`~bnfold.Predictor`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
from ray.data import ActorPoolStrategy, Dataset

from ..errors import BnfoldError, Param, UsageError
from ..predictor import Predictor, check_top_k
from ..staging import PATH, check_output_path, publish_mode, write_failed
from .actor import IMAGE_BYTES, InputColumns, PredictionActor, predict_rows, row_inputs
from .cluster import bnfold_cause, default_cpus_per_actor, node_resources
from .rows import PredictionRows
from .sources import IMAGES, InputRows, read_inputs

Inputs = Dataset | str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
# Rows are gathered into parquet files of about this many bytes (in memory) each, not a file per batch.
FILE_BYTES = 64 << 20


def predict_dataset(
    model: str | os.PathLike[str],
    data: Inputs,
    *,
    batch_size: int = 64,
    top_k: int = 5,
    actors: int | tuple[int, int] = 1,
    cpus_per_actor: float | None = None,
    gpus_per_actor: float = 0.0,
) -> Dataset:
    """A Dataset of one prediction row per input item of ``data`` (lazy: nothing runs until it is
    consumed, e.g. by :func:`write_predictions`).

    ``data``: a Ray ``Dataset`` (an ``item`` or ``path`` column names the rows; the inputs are
    one tensor column per model input, ``data`` for a single input, or ``bytes`` of image files),
    or paths Ray reads: image files, ``.npy``/``.npz`` files (a row per sample, named
    ``file:row``), parquet files, folders, local glob patterns, object-store URLs.

    ``batch_size`` rows per ONNX Runtime call; ``top_k`` classes kept per row of a classifier;
    ``actors``: a fixed pool size or ``(min, max)`` for an autoscaling pool, each actor with
    ``cpus_per_actor`` CPUs (its ONNX Runtime threads; default: the cluster's CPUs shared among
    ``max`` actors, at most one node's) and ``gpus_per_actor`` GPUs (CUDA only with a GPU).
    """
    if batch_size < 1:
        raise UsageError(Param("batch_size"), f" must be at least 1 (got {batch_size})")
    check_top_k(top_k)
    low, high = _pool_size(actors)
    cpus = _check_resources(high, cpus_per_actor, gpus_per_actor)
    predictor = Predictor(model, device="cpu")
    if isinstance(data, Dataset):
        inputs = InputRows(data)
    else:
        paths = [data] if isinstance(data, (str, os.PathLike)) else data
        inputs = read_inputs(paths, predictor.inputs, high)
    if inputs.kind == IMAGES:
        columns, sample = _image_sample(predictor)
    else:
        columns, sample = _first_row(predictor, inputs)
    rows = PredictionRows.for_model(predictor, sample, top_k)
    return inputs.dataset.map_batches(
        PredictionActor,
        fn_constructor_kwargs={"model": str(Path(model).resolve()), "rows": rows, "columns": columns},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=low) if low == high else ActorPoolStrategy(min_size=low, max_size=high),
        num_cpus=cpus,
        num_gpus=gpus_per_actor or None,
        udf_modifying_row_count=False,
    )


def _pool_size(actors: int | tuple[int, int]) -> tuple[int, int]:
    """(min, max) actors of ``actors`` (a size or a ``(min, max)`` pair), checked."""
    low, high = (actors, actors) if isinstance(actors, int) else actors
    if low < 1 or high < low:
        raise UsageError(
            Param("actors"), f" must be a size of at least 1 or (min, max) with 1 <= min <= max (got {actors})"
        )
    return low, high


def _check_resources(actors: int, cpus_per_actor: float | None, gpus_per_actor: float) -> float:
    """The CPUs per actor, after checking that the cluster has room for one actor at least (a pool
    that never starts would wait forever)."""
    if gpus_per_actor < 0:
        raise UsageError(Param("gpus_per_actor"), f" must not be negative (got {gpus_per_actor})")
    if cpus_per_actor is not None and cpus_per_actor <= 0:
        raise UsageError(Param("cpus_per_actor"), f" must be positive (got {cpus_per_actor})")
    nodes = node_resources()
    cpus = default_cpus_per_actor(actors, nodes) if cpus_per_actor is None else cpus_per_actor
    if not any(node["CPU"] >= cpus and node["GPU"] >= gpus_per_actor for node in nodes):
        have = ", ".join(f"{node['CPU']:g} CPU(s) and {node['GPU']:g} GPU(s)" for node in nodes)
        raise BnfoldError(
            f"no node of the Ray cluster has {cpus:g} CPU(s) and {gpus_per_actor:g} GPU(s) for an actor "
            f"(its nodes have {have}): lower ",
            Param("cpus_per_actor"),
            " or ",
            Param("gpus_per_actor"),
        )
    return cpus


def _image_sample(predictor: Predictor) -> tuple[InputColumns, list[np.ndarray]]:
    """Image files: the model must have preprocessing metadata whose images fit its input."""
    preprocess = predictor.image_preprocessing()
    sizes = predictor.image_sizes.get(predictor.inputs[0].name)
    if preprocess.size is None and sizes is None:
        raise UsageError(f"{predictor.path}: its preprocessing keeps each image's size, but it states no image sizes")
    size = preprocess.size or sizes.example
    blank = np.zeros((1, preprocess.channels, *size), dtype=np.float32)
    return InputColumns("item", IMAGE_BYTES), predict_rows(predictor, [{predictor.inputs[0].name: blank}])


def _first_row(predictor: Predictor, inputs: InputRows) -> tuple[InputColumns, list[np.ndarray]]:
    """The first row of ``inputs`` read and predicted on the driver: its columns, and the model's
    outputs."""
    try:
        batch = inputs.first_batch()
    except ValueError as exc:  # the dataset is empty (Ray), or no input file holds a row
        raise UsageError(Param("data"), f" holds no rows ({exc})") from exc
    columns = InputColumns.of(list(batch), [spec.name for spec in predictor.inputs])
    if "error" in batch and batch["error"][0] is not None:
        raise UsageError(str(batch["error"][0]))
    return columns, predict_rows(predictor, [row_inputs(predictor, columns, batch, 0)])


@dataclass(frozen=True)
class PredictionSummary:
    """What :func:`write_predictions` wrote: ``rows`` rows to ``path``, of which ``errors``
    failed, in ``seconds`` (the whole job: start-up, reading, predicting, writing)."""

    path: str
    rows: int
    errors: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def write_predictions(predictions: Dataset, path: str | os.PathLike[str]) -> PredictionSummary:
    """Run ``predictions`` and write them as a folder of parquet files at ``path`` (a local path
    or an object-store URL); count its rows and failed rows.

    A local ``path`` must not exist yet: the files are written into a temporary folder beside it,
    renamed to ``path`` only when complete (nothing is left on failure or interrupt), with the mode
    of a folder created under the umask. An
    object-store URL is written in place.
    """
    target = str(path)
    local = "://" not in target
    if local:
        if os.path.lexists(target):
            raise UsageError(f"output {target} exists; remove it or choose another ", PATH)
        check_output_path(target)
    start = time.perf_counter()
    staging = _staging_folder(Path(target)) if local else target
    try:
        _run(lambda: predictions.write_parquet(staging, min_bytes_per_file=FILE_BYTES, ray_remote_args={"num_cpus": 0}))
        errors_column = pads.dataset(staging, format="parquet").to_table(columns=["error"]).column("error")
        if local:
            publish_mode(staging)
            os.rename(staging, target)
    except BaseException:
        if local:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return PredictionSummary(
        target, len(errors_column), errors_column.length() - errors_column.null_count, time.perf_counter() - start
    )


def _staging_folder(target: Path) -> str:
    try:
        return tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_failed(target, exc) from exc


def _run(job: Callable[[], None]) -> None:
    """Run ``job`` (a Ray Data execution); a bnfold error raised in an actor or task is raised
    here as itself, not wrapped in Ray's errors."""
    dataset_log = logging.getLogger("ray.data.dataset")
    dataset_log.addFilter(_no_cpus_left_warning)
    try:
        job()
    except Exception as exc:
        cause = bnfold_cause(exc)
        if cause is None:
            raise
        raise cause from exc
    finally:
        dataset_log.removeFilter(_no_cpus_left_warning)


def _no_cpus_left_warning(record: logging.LogRecord) -> bool:
    """Drops Ray Data's warning that no CPU is free (so "the job will hang"): the prediction
    actors hold the CPUs on purpose, and the reads and writes need none."""
    return "does not have any available CPUs" not in record.getMessage()
