"""The Ray Data actor that predicts: one :class:`~bnfold.Predictor` per actor, created in the actor
from the model's path (ONNX Runtime sessions cannot be pickled), on the CPUs and GPU Ray assigned
to it; a batch of rows in, a batch of prediction rows out, a row that cannot be predicted a row
with its error."""

from __future__ import annotations

import io
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import BnfoldError, Param, UsageError
from ..images import load_image
from ..predictor import Predictor
from .cluster import actor_device, actor_threads
from .rows import PredictionRows

# Input forms: encoded image files, or one tensor column per model input (bnfold.on_ray.sources'
# arrays, or a user's Dataset: from_numpy, read_numpy, read_parquet, ...).
IMAGE_BYTES, TENSORS = "bytes", "tensors"


@dataclass(frozen=True)
class InputColumns:
    """Which columns of a batch hold what: ``item`` names the rows, ``form`` is how the inputs
    are stored, ``tensors`` the tensor column of each model input (form :data:`TENSORS`)."""

    item: str
    form: str
    tensors: tuple[str, ...] = ()

    @classmethod
    def of(cls, columns: Sequence[str], input_names: Sequence[str]) -> InputColumns:
        """How a Dataset with ``columns`` feeds a model with inputs ``input_names``; a
        :class:`UsageError` saying which columns are missing."""
        item = next((c for c in ("item", "path") if c in columns), None)
        if item is None:
            raise UsageError(
                Param("data"), f" has no 'item' or 'path' column to name its rows (columns: {list(columns)})"
            )
        if IMAGE_BYTES in columns:
            return cls(item, IMAGE_BYTES)
        if all(name in columns for name in input_names):
            return cls(item, TENSORS, tuple(input_names))
        if len(input_names) == 1 and "data" in columns:
            return cls(item, TENSORS, ("data",))
        raise UsageError(
            Param("data"),
            f" has no column for the model input(s) {list(input_names)}: expected one column per "
            f"input name ('data' for a single input), or 'bytes' of image files (columns: {list(columns)})",
        )


def row_inputs(
    predictor: Predictor, columns: InputColumns, batch: Mapping[str, Any], row: int
) -> dict[str, np.ndarray]:
    """The model inputs of one row of ``batch`` as a batch of one; a :class:`UsageError` if the
    row's image or arrays cannot be read."""
    names = [spec.name for spec in predictor.inputs]
    item = str(batch[columns.item][row])
    if columns.form == IMAGE_BYTES:
        image = load_image(io.BytesIO(batch[IMAGE_BYTES][row]), predictor.image_preprocessing(), name=item)
        return {names[0]: image[None]}
    return {name: np.asarray(batch[column][row])[None] for name, column in zip(names, columns.tensors)}


def predict_rows(predictor: Predictor, feeds: Sequence[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """The outputs (model order) of the rows ``feeds``, run as one batch; a :class:`BnfoldError`
    if the model cannot run them (e.g. a wrong shape)."""
    try:
        joined = feeds[0] if len(feeds) == 1 else {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}
    except ValueError as exc:  # rows of different shapes: each one is checked on its own
        raise UsageError(f"the rows of this batch have different shapes ({exc})") from exc
    outputs = predictor.predict(joined)
    return [outputs[spec.name] for spec in predictor.outputs]


class PredictionActor:
    """Ray Data callable class: ``ds.map_batches(PredictionActor, fn_constructor_kwargs=...)``.

    ONNX Runtime runs with as many intra-op threads as the CPUs Ray assigned to the actor, on
    CUDA only when Ray assigned it a GPU (else on the CPU); the actor reports which provider it
    actually uses on stderr, which Ray forwards to the driver.
    """

    def __init__(self, model: str, rows: PredictionRows, columns: InputColumns) -> None:
        threads = actor_threads()
        self.predictor = Predictor(model, device=actor_device(), threads=threads, spin_wait=False)
        self.rows, self.columns = rows, columns
        print(
            f"bnfold: prediction actor on {socket.gethostname()}: {self.predictor.providers[0]}, "
            f"{threads} ONNX Runtime thread(s)",
            file=sys.stderr,
            flush=True,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        items = [str(item) for item in batch[self.columns.item]]
        errors: list[str | None] = list(batch["error"]) if "error" in batch else [None] * len(items)
        tensors = [batch[column] for column in self.columns.tensors]
        if not any(errors) and tensors and all(t.dtype != object for t in tensors):
            # The common case: every row readable, the samples already one array per input.
            try:
                names = [spec.name for spec in self.predictor.inputs]
                return self.rows.table(items, errors, predict_rows(self.predictor, [dict(zip(names, tensors))]))
            except BnfoldError:
                pass  # some rows do not fit the model: each row on its own below
        feeds: dict[int, dict[str, np.ndarray]] = {}
        for row, error in enumerate(errors):
            if error is None:
                try:
                    feeds[row] = row_inputs(self.predictor, self.columns, batch, row)
                except BnfoldError as exc:
                    errors[row] = str(exc)
        outputs = self._predict(feeds, errors)
        return self.rows.table(items, errors, outputs)

    def _predict(self, feeds: dict[int, dict[str, np.ndarray]], errors: list[str | None]) -> list[Any]:
        """The outputs of the rows ``feeds`` (by row number): the rows of one input shape (a
        dynamic-size model's images of one size) run as one batch, never padded; if the model
        cannot run them together, row by row, each row that fails getting its error in
        ``errors``. Each output is one array, or a list of one array per row when the rows'
        outputs differ in shape."""
        groups: dict[tuple[tuple[int, ...], ...], list[int]] = {}
        for row, feed in feeds.items():
            groups.setdefault(tuple(a.shape[1:] for a in feed.values()), []).append(row)
        done: dict[int, list[np.ndarray]] = {}
        for rows in groups.values():
            try:
                outputs = predict_rows(self.predictor, [feeds[row] for row in rows])
                done.update({row: [out[j] for out in outputs] for j, row in enumerate(rows)})
                continue
            except BnfoldError:
                pass
            for row in rows:
                try:
                    done[row] = [out[0] for out in predict_rows(self.predictor, [feeds[row]])]
                except BnfoldError as exc:
                    errors[row] = str(exc)
        if not done:
            return self.rows.no_outputs()
        ordered = [done[row] for row in sorted(done)]
        return [_stacked([outs[i] for outs in ordered]) for i in range(len(ordered[0]))]


def _stacked(rows: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """One output of several rows: stacked into one array when they are of one shape, else the list."""
    return np.stack(rows) if len({row.shape for row in rows}) == 1 else rows
