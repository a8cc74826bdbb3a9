"""A batch-norm (or affine map) followed by a constant per-channel affine map (FrozenBatchNorm2d,
a layer scale) composes with it, as batch-norm → batch-norm does, whatever sits after them.
Exact in float64."""

from __future__ import annotations

import torch
from fold_checks import assert_fold_exact, graph_ops, with_statistics
from helpers import random_input
from test_affine import FrozenBatchNorm2d, LayerScale
from torch import nn

RULES = ("compose_affine",)  # applied alone: see conftest.py


class Chain(nn.Module):
    """``first`` → ``maps`` → ReLU: nothing to fold into, so only composing removes ops."""

    def __init__(self, first: nn.Module, *maps: nn.Module) -> None:
        super().__init__()
        self.first, self.maps = first, nn.Sequential(*maps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.maps(self.first(x)))


def test_a_batchnorm_composes_into_a_following_frozen_batchnorm_and_layer_scale():
    model = with_statistics(Chain(nn.BatchNorm2d(4), FrozenBatchNorm2d(4), LayerScale(4)))
    result = assert_fold_exact(model, random_input(2, 4, 3, 5), ["folded", "folded", "kept"])
    bn, frozen, _ = result.report.entries
    assert (bn.into, frozen.into) == ("maps.0", "maps.1") and "composed" in bn.pattern
    assert graph_ops(result, "batch_norm") == 0 and graph_ops(result, "mul") == 1


def test_a_batchnorm_then_a_layer_scale_on_a_1d_activation_composes():
    model = with_statistics(Chain(nn.BatchNorm1d(6), LayerScale(6, dims=3)))
    assert_fold_exact(model, random_input(2, 6, 7), ["folded", "kept"])


def test_a_batchnorm_whose_output_is_also_read_elsewhere_does_not_compose():
    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.scale = nn.BatchNorm2d(4), LayerScale(4)

        def forward(self, x):
            y = self.bn(x)
            return torch.relu(self.scale(y)) + y

    assert_fold_exact(with_statistics(Both()), random_input(2, 4, 3, 3), ["kept", "kept"])


def test_a_batchnorm_does_not_compose_into_a_layer_scale_of_a_wider_dtype():
    """The float64 scale promotes the float32 activation: composing the BN into it (float32
    constants) would give a float32 output."""
    from fold_checks import assert_fold_float32

    model = with_statistics(Chain(nn.BatchNorm2d(4), LayerScale(4))).float()
    model.maps[0].gamma.data = model.maps[0].gamma.data.double()
    assert_fold_float32(model, random_input(2, 4, 3, 5), ["kept", "kept"])


def test_a_composed_shift_that_is_zero_in_some_channels_only_keeps_the_others():
    model = with_statistics(Chain(nn.BatchNorm2d(4), LayerScale(4)))
    with torch.no_grad():  # channel 0's shift is exactly zero, the others' are not
        model.first.running_mean[0], model.first.bias[0] = 0.0, 0.0
    assert_fold_exact(model, random_input(2, 4, 3, 5), ["folded", "kept"])
