"""Splitting samples into batches: the one routine behind verification, recalibration, the
:class:`~bnfold.Predictor` and ``bnfold predict``."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


@dataclass(frozen=True)
class Batch:
    """The samples ``rows`` of the data, then ``pad`` copies of its last sample (a static batch
    axis takes batches of exactly its size). ``repeated``: these samples come again in a later
    batch (an extra batch size to try, not to be counted twice)."""

    rows: slice
    pad: int = 0
    repeated: bool = False

    @property
    def samples(self) -> int:
        """The number of real (not padding) samples."""
        return self.rows.stop - self.rows.start

    def take(self, values: Mapping[str, T]) -> dict[str, T]:
        """This batch of every numpy array or torch tensor in ``values`` (samples on axis 0)."""
        return {name: _with_last_row_repeated(value[self.rows], self.pad) for name, value in values.items()}


def _with_last_row_repeated(x: Any, times: int) -> Any:
    """``x`` (a numpy array or a torch tensor) with its last row repeated ``times`` more times."""
    if not times:
        return x
    if isinstance(x, np.ndarray):
        return np.concatenate([x, np.repeat(x[-1:], times, axis=0)])
    import torch

    return torch.cat([x, x[-1:].expand(times, *x.shape[1:])])


def plan_batches(
    samples: int, size: int, *, pad_last: bool = False, min_last: int = 1, first_alone: bool = False
) -> list[Batch]:
    """The batches that cover ``samples`` samples in order, ``size`` at a time (none for 0).

    ``pad_last``: the last batch is padded up to ``size`` (a static batch axis).
    ``min_last``: a last batch of fewer samples joins the one before it (recalibration: a batch
    of one sample has no variance). ``first_alone``: with more than one sample, first the first
    sample alone, marked ``repeated`` (a second batch size for a dynamic batch axis).
    """
    if size < 1:
        raise ValueError(f"batch size must be at least 1 (got {size})")
    bounds = [*range(0, samples, size), samples]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < min_last:
        del bounds[-2]
    plan = [Batch(slice(a, b), max(0, size - (b - a)) if pad_last else 0) for a, b in itertools.pairwise(bounds)]
    if first_alone and samples > 1:
        plan.insert(0, Batch(slice(0, 1), repeated=True))
    return plan


def run_in_batches(
    values: Mapping[str, Any],
    plan: list[Batch],
    run: Callable[[dict[str, Any]], list[Any]],
    join: Callable[[list[Any]], Any],
) -> list[Any]:
    """``run`` on each batch of ``plan`` (not empty) taken from ``values``; the outputs of
    padding samples are dropped and each output's parts joined in order with ``join``."""
    parts = []
    for batch in plan:
        outs = run(batch.take(values))
        parts.append([o[: batch.samples] for o in outs] if batch.pad else outs)
    if len(parts) == 1:
        return parts[0]
    return [join([part[i] for part in parts]) for i in range(len(parts[0]))]
