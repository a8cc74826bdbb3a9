"""Top-k classes of a classifier's scores, shared by `bnfold predict` and the Ray layer."""

from __future__ import annotations

import numpy as np
import pytest

import bnfold
from bnfold.predictor import class_label, top_k


def test_top_k_is_best_first_with_ties_in_class_order():
    scores = np.array([[0.1, 0.7, 0.7, 0.2], [3.0, -1.0, 2.0, 5.0]], dtype=np.float32)
    indices, values = top_k(scores, 3)
    assert indices.tolist() == [[1, 2, 3], [3, 0, 2]]
    np.testing.assert_allclose(values, [[0.7, 0.7, 0.2], [5.0, 3.0, 2.0]], rtol=1e-6)


def test_k_larger_than_the_class_count_keeps_every_class():
    indices, values = top_k(np.array([[1.0, 2.0]]), 5)
    assert indices.tolist() == [[1, 0]] and values.shape == (1, 2)


def test_k_below_one_is_refused_naming_the_parameter():
    with pytest.raises(bnfold.UsageError, match="`top_k` must be at least 1 \\(got 0\\)"):
        top_k(np.zeros((1, 3)), 0)


def test_labels_fall_back_to_the_class_index():
    assert class_label(["cat", "dog"], 1) == "dog"
    assert class_label(["cat"], 3) == "3" and class_label(None, 0) == "0"
