"""Which ops a per-channel affine map passes through (bnfold.folding.commuting), on both sides of
each boundary: pools and resampling act on their input's *last* axes, so their rank decides
whether they reach the channel axis; a mean commutes only when it leaves dims 0 and 1 alone, in
any of the forms its ``dim`` argument takes. Each refusal's model is folded anyway with the guard
removed, and the float64 proof shows that fold wrong."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fold_checks import assert_fold_exact, kept_reason, with_statistics
from helpers import random_input
from torch import nn

from bnfold.folding import commuting, fold


class Between(nn.Module):
    """``before`` → BN → ``op`` → ``after``, or ``before`` → ``op`` → BN → ``after``."""

    def __init__(self, bn: nn.Module, op, before: nn.Module, after: nn.Module, bn_first: bool) -> None:
        super().__init__()
        self.bn, self.op, self.before, self.after, self.bn_first = bn, op, before, after, bn_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.before(x)
        y = self.op(self.bn(y)) if self.bn_first else self.bn(self.op(y))
        return self.after(y)


def _without_rank_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard removed: every pool treated as acting on the spatial axes whatever its rank."""
    spatial = commuting._SPATIAL_AXES

    def pool_rank(node):  # the rank each pool reading ``node`` expects
        return next((spatial[u.target] + 2 for u in node.users if u.target in spatial), None)

    monkeypatch.setattr(commuting, "rank", pool_rank)


# Each op keeps the tensor's shape, so only the axis it acts on decides.
RANK_CASES = {
    # BN1d on [N, C] → max_pool1d over dim 1 (the channels) → Linear: input side.
    "max_pool1d on [N, C]": (
        nn.BatchNorm1d(6),
        lambda y: F.max_pool1d(y, 3, 1, 1),
        nn.Identity(),
        nn.Linear(6, 3),
        True,
        (2, 6),
    ),
    # Conv1d → max_pool2d((3, 1)) on [N, C, L], which pools (C, L) as an unbatched image → BN1d.
    "max_pool2d((3, 1)) on [N, C, L]": (
        nn.BatchNorm1d(6),
        lambda y: F.max_pool2d(y, (3, 1), 1, (1, 0)),
        nn.Conv1d(3, 6, 3),
        nn.Identity(),
        False,
        (2, 3, 9),
    ),
    # Conv2d → avg_pool3d((3, 1, 1)) on [N, C, H, W] (pools C, H, W) → BN2d.
    "avg_pool3d on [N, C, H, W]": (
        nn.BatchNorm2d(6),
        lambda y: F.avg_pool3d(y, (3, 1, 1), 1, (1, 0, 0), count_include_pad=False),
        nn.Conv2d(3, 6, 3),
        nn.Identity(),
        False,
        (2, 3, 7, 7),
    ),
}


@pytest.mark.parametrize("case", RANK_CASES, ids=list(RANK_CASES))
def test_a_pool_that_reaches_the_channel_axis_by_its_input_rank_is_kept_and_folding_anyway_is_wrong(case, monkeypatch):
    bn, op, before, after, bn_first, shape = RANK_CASES[case]
    model = with_statistics(Between(bn, op, before, after, bn_first))
    with torch.no_grad():
        model.bn.weight.abs_()  # a positive scale: only the rank stands in the way
    result = assert_fold_exact(model, random_input(*shape), ["kept"])
    assert "which include the channel axis" in kept_reason(result)
    _without_rank_check(monkeypatch)
    (entry,) = fold(model.double(), (random_input(*shape).double(),)).report.entries
    assert entry.reason.startswith("float64 proof failed"), entry


def test_the_same_pools_on_inputs_of_their_own_rank_fold():
    for bn, op, before, after, bn_first, shape in (
        (nn.BatchNorm1d(6), lambda y: F.max_pool1d(y, 3, 1, 1), nn.Conv1d(3, 6, 3), nn.Identity(), False, (2, 3, 9)),
        (nn.BatchNorm2d(6), lambda y: F.avg_pool2d(y, 2), nn.Identity(), nn.Conv2d(6, 2, 1), True, (2, 6, 4, 6)),
    ):
        model = with_statistics(Between(bn, op, before, after, bn_first))
        with torch.no_grad():
            model.bn.weight.abs_()  # max pooling needs a positive scale
        assert_fold_exact(model, random_input(*shape), ["folded"])


# (the mean, the features it leaves for the Linear, what must happen), on [2, 4, 3, 5] inputs.
MEANS = {
    "negative spatial dims": (lambda y: y.mean((-1, -2)), 4, "folded"),
    "spatial dims, keepdim then flatten": (lambda y: y.mean((2, 3), keepdim=True).flatten(1), 4, "folded"),
    "one spatial dim": (lambda y: y.mean(-1).flatten(1), 12, "folded"),
    "the channel axis as -3": (lambda y: y.mean(-3, keepdim=True).flatten(1), 15, "kept"),
    "every axis (dim=None)": (lambda y: torch.mean(y, dim=None, keepdim=True).flatten(1), 1, "kept"),
}


@pytest.mark.parametrize("case", MEANS, ids=list(MEANS))
def test_a_mean_commutes_only_over_spatial_axes_whatever_the_form_of_its_dims(case):
    mean, features, status = MEANS[case]
    model = with_statistics(Between(nn.BatchNorm2d(4), mean, nn.Identity(), nn.Linear(features, 3), True))
    result = assert_fold_exact(model, random_input(2, 4, 3, 5), [status])
    if status == "kept":
        assert "mixes the channels" in kept_reason(result)


@pytest.mark.parametrize(
    "pool, status",
    [
        (lambda y: F.avg_pool2d(y, 2, divisor_override=3), "kept"),
        (lambda y: F.avg_pool2d(y, 3, 2, ceil_mode=True), "kept"),  # the last window is partial
        (lambda y: F.avg_pool2d(y, 3, 2, 1, count_include_pad=False), "folded"),
        (lambda y: F.avg_pool2d(y, 2), "folded"),
    ],
    ids=["divisor_override", "ceil_mode", "padding not counted", "plain"],
)
def test_an_average_pool_passes_a_shift_only_when_it_divides_by_what_it_sums(pool, status):
    model = with_statistics(Between(nn.BatchNorm2d(4), pool, nn.Identity(), nn.Conv2d(4, 3, 1), True))
    assert_fold_exact(model, random_input(2, 4, 7, 7), [status])


class LinearThenPool(nn.Module):
    """Linear on [N, T, F] → a pool over F → BatchNorm1d over T: the BN's channels are tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(F.avg_pool1d(self.fc(x), 2))


def test_kept_after_a_linear_and_a_pool_since_the_linear_features_are_not_the_channels():
    assert_fold_exact(with_statistics(LinearThenPool()), random_input(2, 8, 8), ["kept"])


class PooledAlsoReturned(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        pooled = F.max_pool2d(self.conv(x), 2)
        return self.bn(pooled), pooled


def test_kept_when_the_pooled_tensor_between_the_conv_and_the_batchnorm_is_also_returned():
    model = with_statistics(PooledAlsoReturned())
    with torch.no_grad():
        model.bn.weight.abs_()
    assert_fold_exact(model, random_input(2, 3, 8, 8), ["kept"])


class TwoPools(nn.Module):
    """ReLU → BN (one negative scale) → average pool → max pool → flatten → Linear: the max pool
    is the second op of the chain."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.fc = nn.BatchNorm2d(4), nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        y = F.max_pool2d(F.avg_pool2d(self.bn(torch.relu(x)), 2), 2)
        return self.fc(y.flatten(1))


def test_every_op_of_a_chain_is_checked_not_only_the_first():
    model = with_statistics(TwoPools())
    with torch.no_grad():
        model.bn.weight.abs_()
        model.bn.weight[1] = -model.bn.weight[1]
    assert "max pool" in kept_reason(assert_fold_exact(model, random_input(2, 4, 8, 8), ["kept"]))
