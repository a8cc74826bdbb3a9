"""Reading a classifier's scores: its top k classes, their scores and their labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import Param, UsageError


def check_top_k(k: int) -> None:
    """A :class:`UsageError` unless ``k`` (the number of classes to keep) is at least 1."""
    if k < 1:
        raise UsageError(Param("top_k"), f" must be at least 1 (got {k})")


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(class indices, their scores), each ``[N, min(k, classes)]``, best first, for the
    ``[N, classes]`` ``scores`` of a classifier; ties keep the lower class first."""
    check_top_k(k)
    indices = np.argsort(-scores, axis=1, kind="stable")[:, : min(k, scores.shape[1])]
    return indices, np.take_along_axis(scores, indices, axis=1)


def class_label(labels: Sequence[str] | None, index: int) -> str:
    """The stored label of class ``index``, or the index itself when there is no such label."""
    return labels[index] if labels and index < len(labels) else str(int(index))
