"""Per-channel affine maps fold through the ops they commute with (issue 12, "one mechanism"):
pooling, means, resampling and flatten between a batch-norm and a weight layer, on either side;
max pooling only with positive scales, padded average pooling only without a shift. Exact in
float64; each refusal has a case where folding anyway would be wrong."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fold_checks import (
    assert_fold_exact,
    assert_onnx_matches,
    assert_wrong,
    bn_affine,
    float64_copy,
    graph_ops,
    kept_reason,
    run,
    with_statistics,
    zero_shift,
)
from helpers import onnx_batchnorms, random_input
from torch import nn

from bnfold.folding import math as fold_math

RULES = ("through_out", "through_in")  # applied alone: see conftest.py


class Head(nn.Module):
    """BN → ``between`` → Linear (a classifier head)."""

    def __init__(self, between, features: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.between = between
        self.fc = nn.Linear(features, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.between(self.bn(x)))


def test_batchnorm_before_global_pooling_and_a_linear_head_folds_into_the_linear():
    head = Head(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), 4)
    result = assert_fold_exact(with_statistics(head), random_input(2, 4, 5, 5), ["folded"])
    assert result.report.entries[0].into == "fc" and graph_ops(result, "batch_norm") == 0


def test_batchnorm_before_a_spatial_mean_folds_into_the_linear():
    head = Head(lambda y: y.mean((2, 3)), 4)
    assert_fold_exact(with_statistics(head), random_input(2, 4, 5, 5), ["folded"])


def test_batchnorm_before_a_flatten_of_feature_maps_folds_with_each_channel_repeated():
    head = Head(nn.Flatten(), 4 * 3 * 3)
    assert_fold_exact(with_statistics(head), random_input(2, 4, 3, 3), ["folded"])


class PoolThenConv(nn.Module):
    def __init__(self, pool) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.pool = pool
        self.conv = nn.Conv2d(4, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(self.bn(x)))


def _naive_input_side(model: PoolThenConv, x: torch.Tensor) -> torch.Tensor:
    m = float64_copy(model)
    s, t = bn_affine(m.bn)
    w, b = fold_math.scale_input_channels(m.conv.weight, m.conv.bias, s, t, 1)
    return F.conv2d(m.pool(x), w, b)


def test_batchnorm_through_upsampling_folds_into_the_following_conv():
    model = PoolThenConv(nn.Upsample(scale_factor=2, mode="bilinear"))
    assert_fold_exact(with_statistics(model), random_input(2, 4, 4, 4), ["folded"])


def test_kept_shift_through_an_average_pool_that_counts_padding_and_folding_anyway_would_be_wrong():
    model = with_statistics(PoolThenConv(nn.AvgPool2d(3, stride=1, padding=1)))
    x = random_input(2, 4, 6, 6).double()
    result = assert_fold_exact(model, x, ["kept"])
    assert "counts padding" in kept_reason(result)
    assert_wrong(run(float64_copy(model), x)[0], _naive_input_side(model, x))


def test_without_a_shift_a_padded_average_pool_lets_the_scale_through():
    model = with_statistics(PoolThenConv(nn.AvgPool2d(3, stride=1, padding=1)))
    zero_shift(model.bn)
    assert_fold_exact(model, random_input(2, 4, 6, 6), ["folded"])


def with_scale_signs(model: nn.Module, negative: bool) -> nn.Module:
    with torch.no_grad():
        model.bn.weight.abs_()
        if negative:
            model.bn.weight[0] = -model.bn.weight[0]
    return model


def test_max_pool_with_positive_scales_folds_and_with_a_negative_one_is_kept_as_it_would_be_wrong():
    positive = with_scale_signs(with_statistics(PoolThenConv(nn.MaxPool2d(2))), negative=False)
    assert_fold_exact(positive, random_input(2, 4, 6, 6), ["folded"])
    negative = with_scale_signs(with_statistics(PoolThenConv(nn.MaxPool2d(2))), negative=True)
    x = random_input(2, 4, 6, 6).double()
    result = assert_fold_exact(negative, x, ["kept"])
    assert "scale is not positive" in kept_reason(result)
    assert_wrong(run(float64_copy(negative), x)[0], _naive_input_side(negative, x))


class Stem(nn.Module):
    """conv → max-pool → BN (output side at a distance)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.pool(self.conv(x))))


def test_conv_max_pool_batchnorm_stem_folds_into_the_conv_with_positive_scales():
    stem = with_scale_signs(with_statistics(Stem()), negative=False)
    result = assert_fold_exact(stem, random_input(2, 3, 6, 6), ["folded"])
    assert result.report.entries[0].into == "conv"


def test_conv_max_pool_batchnorm_with_a_negative_scale_is_kept_as_folding_would_be_wrong():
    stem = with_scale_signs(with_statistics(Stem()), negative=True)
    x = random_input(2, 3, 6, 6).double()
    result = assert_fold_exact(stem, x, ["kept"])
    assert "scale is not positive" in kept_reason(result)
    m = float64_copy(stem)
    s, t = bn_affine(m.bn)
    w, b = fold_math.scale_output_channels(m.conv.weight, m.conv.bias, s, t)
    naive = torch.relu(m.pool(F.conv2d(x, w, b, padding=1)))
    assert_wrong(run(m, x)[0], naive)


def test_through_ops_forms_export_with_no_batchnormalization_left_in_onnx(tmp_path):
    head = with_statistics(Head(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), 4))
    stem = with_scale_signs(with_statistics(Stem()), negative=False)
    for i, (model, x) in enumerate(((head, random_input(2, 4, 5, 5)), (stem, random_input(2, 3, 6, 6)))):
        assert_onnx_matches(model, x, tmp_path / f"m{i}.onnx")
        assert onnx_batchnorms(tmp_path / f"m{i}.onnx") == 0
