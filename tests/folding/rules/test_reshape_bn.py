"""Linear -> reshape/flatten/permute -> BatchNorm1d (LeViT's Linear_BN) folds into the Linear when
the reshapes carry its features to the batch-norm's channel axis, exactly (float64, per channel);
each guard of the rule keeps a batch-norm that folding would get wrong."""

from __future__ import annotations

import pytest
import torch.nn.functional as F
from fold_checks import (
    assert_fold_exact,
    assert_onnx_matches,
    assert_wrong,
    bn_affine,
    float64_copy,
    fold_checked,
    kept_entry,
    run,
    with_statistics,
)
from helpers import random_input
from torch import nn

from bnfold.folding import math as fold_math

RULES = ("reshape_bn",)  # applied alone: see conftest.py


class LinearBN(nn.Module):
    """LeViT's Linear_BN: Linear on [B, N, C], flattened to [B*N, C] for BatchNorm1d, reshaped back."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5 * 4 if how == "merge" else 5)

    def forward(self, x):
        y = self.fc(x)
        if self.how == "flatten":
            return self.bn(y.flatten(0, 1)).reshape_as(y)
        if self.how == "permute":
            return self.bn(y.permute(0, 2, 1))
        return self.bn(y.reshape(y.shape[0], -1))  # "merge": BN channels are (token, feature) pairs


@pytest.mark.parametrize("how, channel_dim", [("flatten", -1), ("permute", 1)])
def test_linear_reshape_batchnorm1d_is_folded(how, channel_dim):
    result = fold_checked(with_statistics(LinearBN(how)), random_input(2, 4, 6), ["folded"], channel_dim=channel_dim)
    assert result.report.entries[0].into == "fc"
    assert result.report.entries[0].pattern == f"Linear → {how} → BatchNorm1d"  # reshape_bn's own pattern


# ------------------------------------------------------------- kept, and why folding would be wrong
def test_kept_reshape_that_merges_the_feature_axis():
    model = with_statistics(LinearBN("merge"))
    result = assert_fold_exact(model, random_input(2, 4, 6), ["kept"])
    assert "does not put the Linear's features" in kept_entry(result).reason
    # Folded anyway, the rewrite cannot even be formed: 20 (token, feature) scales for 5 features.
    m = float64_copy(model)
    with pytest.raises(RuntimeError):
        fold_math.scale_output_channels(m.fc.weight, m.fc.bias, *bn_affine(m.bn))


class SwappedTokens(nn.Module):
    """Linear(4 -> 4) on [B, T, U, 4], then the T and U axes swapped, BatchNorm2d(4) over U:
    the features stay on the last axis, and U happens to be as wide as them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.fc(x).permute(0, 2, 1, 3))


def test_kept_reshape_that_leaves_the_features_off_the_channel_axis():
    model = with_statistics(SwappedTokens())
    x = random_input(2, 3, 4, 4).double()
    assert "does not put the Linear's features" in kept_entry(assert_fold_exact(model, x, ["kept"])).reason
    m = float64_copy(model)
    w, b = fold_math.scale_output_channels(m.fc.weight, m.fc.bias, *bn_affine(m.bn))
    assert_wrong(run(m, x)[0], F.linear(x, w, b).permute(0, 2, 1, 3))


class FlatAlsoReturned(nn.Module):
    """The flattened Linear output goes to the batch-norm and is also returned as it is."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        flat = self.fc(x).flatten(0, 1)
        return self.bn(flat), flat


def test_kept_reshaped_linear_output_used_elsewhere():
    model = with_statistics(FlatAlsoReturned())
    x = random_input(2, 4, 6).double()
    assert "also used elsewhere" in kept_entry(assert_fold_exact(model, x, ["kept"])).reason
    # Folded anyway, the second output would be normalised too.
    m = float64_copy(model)
    w, b = fold_math.scale_output_channels(m.fc.weight, m.fc.bias, *bn_affine(m.bn))
    assert_wrong(run(m, x)[1], F.linear(x, w, b).flatten(0, 1))


# ------------------------------------------------------------------------------ ONNX layer
def test_onnx_export_of_a_reshape_fold(tmp_path):
    assert_onnx_matches(with_statistics(LinearBN("flatten")), random_input(2, 4, 6), tmp_path / "model.onnx")


class UnitAxes(nn.Module):
    """A Linear's ``[N, F]`` output given unit axes before BatchNorm1d: the features stay on dim 1."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.fc, self.bn = how, nn.Linear(6, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        y = self.fc(x)
        if self.how == "view":
            return self.bn(y.view(y.shape[0], 5, 1))
        if self.how == "unsqueeze":
            return self.bn(y.unsqueeze(-1))
        return self.bn(y.unsqueeze(1).transpose(1, 2))  # "unsqueeze+transpose"


@pytest.mark.parametrize("how", ["view", "unsqueeze", "unsqueeze+transpose"])
def test_a_linear_output_given_unit_axes_keeps_its_features_on_the_channel_axis_and_folds(how):
    result = assert_fold_exact(with_statistics(UnitAxes(how)), random_input(3, 6), ["folded"])
    assert result.report.entries[0].into == "fc"


class Scrambled(nn.Module):
    """Linear(16, 8) on [2, 5, 16] → view(2, 8, 5): each BN channel gets features of several
    tokens (the sizes match, the values do not)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(16, 8), nn.BatchNorm1d(8)

    def forward(self, x):
        y = self.fc(x)
        return self.bn(y.view(y.shape[0], 8, 5))


def test_kept_when_a_view_gives_the_feature_axis_its_size_but_not_its_values():
    assert_fold_exact(with_statistics(Scrambled()), random_input(2, 5, 16), ["kept"])


class ChannelsLast(nn.Module):
    """A Linear over the channels of an NHWC map, permuted back to NCHW for a BatchNorm2d."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 6), nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.fc(x).permute(0, 3, 1, 2))


def test_a_channels_last_linear_permuted_back_folds_by_the_reshape_rule():
    result = assert_fold_exact(with_statistics(ChannelsLast()), random_input(2, 3, 5, 4), ["folded"])
    assert result.report.entries[0].pattern == "Linear → permute → BatchNorm2d"


class Transposed(nn.Module):
    """LeViT's attention projections: Linear on [N, L, F], ``transpose(1, 2)``, BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x).transpose(1, 2))


def test_a_linear_then_a_transpose_of_its_last_two_axes_folds():
    result = assert_fold_exact(with_statistics(Transposed()), random_input(2, 4, 6), ["folded"])
    assert result.report.entries[0].pattern == "Linear → transpose → BatchNorm1d"
