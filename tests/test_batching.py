"""The one batching routine: every sample once and in order, with each caller's twist (a padded
static batch, no last batch of one for recalibration, a lone first sample for verification)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bnfold.batching import Batch, plan_batches, run_in_batches


def sizes(plan: list[Batch]) -> list[tuple[int, int]]:
    return [(b.samples, b.pad) for b in plan]


@given(samples=st.integers(0, 200), size=st.integers(1, 50), pad_last=st.booleans(), min_last=st.integers(1, 3))
def test_every_sample_comes_once_in_order(samples, size, pad_last, min_last):
    plan = plan_batches(samples, size, pad_last=pad_last, min_last=min_last)
    covered = [i for b in plan for i in range(b.rows.start, b.rows.stop)]
    assert covered == list(range(samples))
    assert all(b.samples <= size for b in plan[:-1]) and not any(b.repeated for b in plan)
    if pad_last:
        assert all(b.samples + b.pad == size for b in plan if b.samples <= size)
    else:
        assert all(b.pad == 0 for b in plan)


def test_plain_batches():
    assert sizes(plan_batches(10, 3)) == [(3, 0), (3, 0), (3, 0), (1, 0)]
    assert sizes(plan_batches(6, 3)) == [(3, 0), (3, 0)]
    assert plan_batches(0, 3) == []


def test_a_static_batch_pads_the_last_batch():
    assert sizes(plan_batches(10, 4, pad_last=True)) == [(4, 0), (4, 0), (2, 2)]
    assert sizes(plan_batches(3, 4, pad_last=True)) == [(3, 1)]


def test_a_short_last_batch_joins_the_one_before():
    assert sizes(plan_batches(53, 13, min_last=2)) == [(13, 0), (13, 0), (13, 0), (14, 0)]
    assert sizes(plan_batches(54, 13, min_last=2)) == [(13, 0), (13, 0), (13, 0), (13, 0), (2, 0)]
    assert sizes(plan_batches(1, 13, min_last=2)) == [(1, 0)]  # nothing to join


def test_the_first_sample_alone_comes_first_and_is_marked_repeated():
    plan = plan_batches(5, 64, first_alone=True)
    assert [(b.rows, b.repeated) for b in plan] == [(slice(0, 1), True), (slice(0, 5), False)]
    assert plan_batches(1, 64, first_alone=True) == [Batch(slice(0, 1))]  # one sample: one batch size only


def test_a_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        plan_batches(3, 0)


@pytest.mark.parametrize("make", [np.asarray, torch.as_tensor], ids=["numpy", "torch"])
def test_take_slices_and_pads_with_the_last_sample(make):
    values = {"x": make(np.arange(10.0).reshape(5, 2)), "y": make(np.arange(5.0))}
    got = Batch(slice(3, 5), pad=2).take(values)
    assert np.asarray(got["x"]).tolist() == [[6.0, 7.0], [8.0, 9.0], [8.0, 9.0], [8.0, 9.0]]
    assert np.asarray(got["y"]).tolist() == [3.0, 4.0, 4.0, 4.0]


def test_run_in_batches_drops_the_padding_outputs_and_joins_in_order():
    x = np.arange(10.0)
    seen: list[list[float]] = []

    def run(part):
        seen.append(part["x"].tolist())
        return [part["x"] * 2, part["x"][:, None]]

    doubled, column = run_in_batches({"x": x}, plan_batches(10, 4, pad_last=True), run, np.concatenate)
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 9, 9]]
    np.testing.assert_array_equal(doubled, x * 2)
    np.testing.assert_array_equal(column, x[:, None])
