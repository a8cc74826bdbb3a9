"""The INT8 check's measures: SQNR in dB, normwise max relative error and top-1 agreement,
accumulated over batches, and the verdict against the budget."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bnfold.quantization.metrics import OutputError, is_classifier, sqnr_db


def test_sqnr_is_the_power_ratio_in_db():
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert sqnr_db(1.0, 0.0) == math.inf and sqnr_db(0.0, 1.0) == -math.inf


def test_noise_at_a_tenth_of_the_signal_is_20_db_over_batches():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((64, 10))
    noise = rng.standard_normal((64, 10))
    noise *= 0.1 * np.sqrt(np.square(ref).sum() / np.square(noise).sum())  # RMS exactly 10% of the signal's
    error = OutputError("y")
    for rows in (slice(0, 10), slice(10, 64)):  # two batches add up to the whole
        error.add(ref[rows], ref[rows] + noise[rows])
    assert error.sqnr_db == pytest.approx(20.0)
    out = error.judge(0.0, 20.0 - 1e-9)
    assert out.passed and not error.judge(0.0, 20.0 + 1e-9).passed
    assert out.max_rel_error == pytest.approx(np.abs(noise).max() / np.abs(ref).max())


def test_top1_agreement_counts_rows_of_classifier_outputs_only():
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    got = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # the last row changes class
    error = OutputError("logits")
    error.add(ref, got)
    assert error.agreement == 0.75
    assert not error.judge(0.99, -math.inf).passed and error.judge(0.75, -math.inf).passed
    segmentation = OutputError("mask")
    segmentation.add(np.ones((2, 2, 4, 4)), np.ones((2, 2, 4, 4)))
    assert segmentation.agreement is None and not is_classifier((2, 2, 4, 4)) and not is_classifier((4, 1))


@pytest.mark.parametrize(
    ("got", "problem"),
    [(np.full((2, 3), np.nan), "NaN/inf"), (np.zeros((2, 4)), "shape (2, 4) in ONNX but (2, 3) in PyTorch")],
)
def test_nan_or_another_shape_fails_whatever_the_budget(got, problem):
    error = OutputError("y")
    error.add(np.ones((2, 3)), got)
    out = error.judge(0.0, -math.inf)
    assert not out.passed and problem in out.problem and out.sqnr_db == -math.inf
