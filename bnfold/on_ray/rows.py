"""The prediction rows' schema and how a batch of predictions becomes rows of it.

One row per input item: ``item``; for a classifier (one 2-D output) ``top_k_indices``,
``top_k_scores`` and, when the model stores labels, ``top_k_labels``; otherwise the raw output
of the item (``output``, or ``output_<name>`` for several outputs, as fixed-shape tensors; an
output whose shape follows a dynamic image size as a flat list beside ``<column>_shape``); and
``error`` (null when the row succeeded; the other columns are null when it failed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..predictor import Predictor, class_label, top_k


@dataclass(frozen=True)
class OutputColumn:
    """A raw output column: its name, and the shape and numpy dtype of one item's output;
    ``variable``: the shape differs from item to item (a dynamic-size model's output that follows
    the image size), so the column holds each item's values flattened, and the column
    ``<name>_shape`` their shape."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    variable: bool = False

    @property
    def arrow_type(self) -> pa.DataType:
        value = pa.from_numpy_dtype(np.dtype(self.dtype))
        if self.variable:
            return pa.list_(value)
        return pa.fixed_shape_tensor(value, self.shape) if self.shape else value

    @property
    def fields(self) -> list[pa.Field]:
        """The column's fields: the values, and the shapes of a variable-shape output."""
        shape = [pa.field(f"{self.name}_shape", pa.list_(pa.int64(), len(self.shape)))] if self.variable else []
        return [pa.field(self.name, self.arrow_type), *shape]


@dataclass(frozen=True)
class PredictionRows:
    """The schema of the rows of a model whose ``outputs`` are these: the ``k`` top classes of a
    classifier (``None`` for other models, whose rows hold the raw outputs) and their ``labels``
    by class index (``None`` when the model stores none)."""

    outputs: tuple[OutputColumn, ...]
    k: int | None
    labels: tuple[str, ...] | None

    @classmethod
    def for_model(cls, predictor: Predictor, sample: Sequence[np.ndarray], k: int) -> PredictionRows:
        """The rows of ``predictor``'s model, whose outputs on one sample are ``sample`` (in the
        model's output order), keeping ``k`` classes of a classifier."""
        names = ["output"] if len(sample) == 1 else [f"output_{spec.name}" for spec in predictor.outputs]
        outputs = tuple(
            OutputColumn(n, s.shape[1:], s.dtype.name, any(not isinstance(d, int) for d in spec.shape[1:]))
            for n, s, spec in zip(names, sample, predictor.outputs)
        )
        if len(sample) != 1 or sample[0].ndim != 2:
            return cls(outputs, None, None)
        classes = sample[0].shape[1]
        labels = tuple(class_label(predictor.labels, j) for j in range(classes)) if predictor.labels else None
        return cls(outputs, min(k, classes), labels)

    @property
    def schema(self) -> pa.Schema:
        """The Arrow schema of every batch of rows."""
        fields = [pa.field("item", pa.string())]
        if self.k is None:
            fields += [field for column in self.outputs for field in column.fields]
        else:
            scores = pa.from_numpy_dtype(np.dtype(self.outputs[0].dtype))
            fields += [pa.field("top_k_indices", pa.list_(pa.int64(), self.k))]
            fields += [pa.field("top_k_scores", pa.list_(scores, self.k))]
            if self.labels is not None:
                fields += [pa.field("top_k_labels", pa.list_(pa.string(), self.k))]
        return pa.schema([*fields, pa.field("error", pa.string())])

    def no_outputs(self) -> list[np.ndarray]:
        """The outputs of no item (for a batch whose every row failed)."""
        return [np.zeros((0, *column.shape), dtype=column.dtype) for column in self.outputs]

    def table(
        self, items: Sequence[str], errors: Sequence[str | None], outputs: Sequence[np.ndarray | list[np.ndarray]]
    ) -> pa.Table:
        """The rows of ``items``: ``outputs`` (in the model's order; each one array, or a list of
        one array per item when their shapes differ) hold the predictions of the items whose
        ``errors`` entry is ``None``, in order."""
        failed = np.array([e is not None for e in errors], dtype=bool)
        missing = pa.array(failed)
        columns: list[pa.Array] = [pa.array(list(items), pa.string())]
        if self.k is not None:
            indices, scores = top_k(outputs[0], self.k)
            indices, scores = _spread(indices, failed), _spread(scores, failed)
            columns += [_lists(indices, missing), _lists(scores, missing)]
            if self.labels is not None:
                columns.append(_lists(np.asarray(self.labels, dtype=object)[indices], missing))
        else:
            for column, values in zip(self.outputs, outputs):
                if column.variable:
                    columns += _variable(column, values, failed)
                    continue
                full = _spread(values.astype(column.dtype, copy=False), failed)
                if column.shape:
                    storage = _lists(full.reshape(len(full), -1), missing)
                    columns.append(pa.ExtensionArray.from_storage(column.arrow_type, storage))
                else:
                    columns.append(pa.array(full, mask=failed))
        columns.append(pa.array(list(errors), pa.string()))
        return pa.Table.from_arrays(columns, schema=self.schema)


def _variable(column: OutputColumn, values: np.ndarray | list[np.ndarray], failed: np.ndarray) -> list[pa.Array]:
    """The values (flattened) and shape columns of a variable-shape output; null where an item failed."""
    done = iter(values)
    rows = [None if bad else np.asarray(next(done), dtype=column.dtype) for bad in failed]
    data = pa.array([None if r is None else r.reshape(-1) for r in rows], column.arrow_type)
    shapes = pa.array([None if r is None else list(r.shape) for r in rows], column.fields[1].type)
    return [data, shapes]


def _spread(values: np.ndarray, failed: np.ndarray) -> np.ndarray:
    """``values`` of the rows that did not fail, placed among placeholder rows for those that did."""
    if not failed.any():
        return values
    full = np.zeros((len(failed), *values.shape[1:]), dtype=values.dtype)
    full[~failed] = values
    return full


def _lists(values: np.ndarray, missing: pa.Array) -> pa.FixedSizeListArray:
    """Each row of the 2-D ``values`` as a fixed-size list, null where ``missing``."""
    flat = pa.array(values.reshape(-1)) if values.dtype != object else pa.array(values.reshape(-1), pa.string())
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1], mask=missing)
