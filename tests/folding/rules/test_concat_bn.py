"""Split -> convs -> Concat -> BN (MixNet): each conv takes its slice of the batch-norm, exactly
(float64, per channel); each guard of the rule keeps a batch-norm that folding would get wrong."""

from __future__ import annotations

import pytest
import torch
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

RULES = ("concat_bn",)  # applied alone: see conftest.py


def folded_conv(conv: nn.Conv2d, s: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``conv`` with ``s * y + t`` folded into its output channels, applied to ``x``."""
    w, b = fold_math.scale_output_channels(conv.weight, conv.bias, s, t)
    return F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


# ---------------------------------------------------------------------------------- folded
class MixedKernels(nn.Module):
    """MixNet-style: channel groups convolved with different kernels, concatenated, one BN."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim
        self.c3, self.c5 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 2, 5, padding=2, bias=False)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        a, b = torch.split(x, [3, 3], dim=1)
        return self.bn(torch.cat([self.c3(a), self.c5(b)], dim=self.dim))


@pytest.mark.parametrize("dim", [1, -3])
def test_split_convs_concat_bn_folds_one_slice_into_each_conv(dim):
    result = fold_checked(with_statistics(MixedKernels(dim)), random_input(2, 6, 8, 8), ["folded"])
    assert result.report.entries[0].into == "c3, c5"


class LinearConcat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fa, self.fb = nn.Linear(4, 3), nn.Linear(4, 2, bias=False)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(torch.cat([self.fa(x), self.fb(x)], 1))


def test_concat_of_2d_linear_outputs_then_batchnorm1d():
    result = fold_checked(with_statistics(LinearConcat()), random_input(4, 4), ["folded"])
    assert result.report.entries[0].into == "fa, fb"


# ------------------------------------------------------------- kept, and why folding would be wrong
class DenseLayer(nn.Module):
    """DenseNet: the concatenated features feed a BN and are also read by the next concat."""

    def __init__(self, cin: int = 3) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(cin, 3, 1), nn.Conv2d(cin, 3, 1)
        self.bn = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 2, 3, padding=1)

    def forward(self, x):
        features = torch.cat([self.c1(x), self.c2(x)], 1)
        return torch.cat([features, self.conv(torch.relu(self.bn(features)))], 1)


def test_kept_concat_with_other_readers():
    model = with_statistics(DenseLayer())
    x = random_input(2, 3, 6, 6).double()
    result = assert_fold_exact(model, x, ["kept"])
    assert "other op(s) also read" in kept_entry(result).reason
    assert result.report.kept_by_reason() == {"after Concat of shared features": 1}
    # Folded anyway, the next concat would read the normalised features.
    m = float64_copy(model)
    s, t = bn_affine(m.bn)
    features = torch.cat([folded_conv(m.c1, s[:3], t[:3], x), folded_conv(m.c2, s[3:], t[3:], x)], 1)
    assert_wrong(run(m, x)[0], torch.cat([features, m.conv(torch.relu(features))], 1))


class RowConcat(nn.Module):
    """Two convs' one-row outputs stacked along the height, [N, 2, 1, W] twice, then BatchNorm2d(2):
    the concat's widths along its axis (1 + 1) happen to add up to the channel count."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 2, (1, 3), padding=(0, 1)), nn.Conv2d(2, 2, (1, 3), padding=(0, 1))
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(torch.cat([self.a(x), self.b(x)], dim=2))


def test_kept_concat_not_along_the_channel_axis():
    model = with_statistics(RowConcat())
    x = random_input(2, 2, 1, 6).double()
    assert "not along the channel axis" in kept_entry(assert_fold_exact(model, x, ["kept"])).reason
    # Folded anyway, one slice per input along the concat axis: every channel of an input would
    # get that one slice's scale and shift instead of its own channel's.
    m = float64_copy(model)
    s, t = bn_affine(m.bn)
    naive = torch.cat([folded_conv(m.a, s[:1], t[:1], x), folded_conv(m.b, s[1:], t[1:], x)], dim=2)
    assert_wrong(run(m, x)[0], naive)


class Doubled(nn.Module):
    """One conv output concatenated with itself."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(torch.cat([y, y], 1))


def test_kept_concat_inputs_not_distinct():
    model = with_statistics(Doubled())
    x = random_input(2, 3, 6, 6).double()
    assert "not all distinct conv/linear outputs" in kept_entry(assert_fold_exact(model, x, ["kept"])).reason
    # Folded anyway, slice by slice into the same conv: both copies get both slices, composed.
    m = float64_copy(model)
    s, t = bn_affine(m.bn)
    w, b = fold_math.scale_output_channels(m.conv.weight, m.conv.bias, s[:2], t[:2])
    w, b = fold_math.scale_output_channels(w, b, s[2:], t[2:])
    y = F.conv2d(x, w, b, padding=1)
    assert_wrong(run(m, x)[0], torch.cat([y, y], 1))


class WithInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(torch.cat([self.conv(x), x], 1))


def test_kept_concat_input_not_a_conv_output():
    result = assert_fold_exact(with_statistics(WithInput()), random_input(2, 3, 5, 5), ["kept"])
    assert "not all distinct conv/linear outputs" in kept_entry(result).reason


class TokenConcat(nn.Module):
    """Linear(4 -> 4) outputs on [N, 4 tokens, 4], concatenated along the tokens, BatchNorm1d(8)."""

    def __init__(self) -> None:
        super().__init__()
        self.fa, self.fb = nn.Linear(4, 4), nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(torch.cat([self.fa(x), self.fb(x)], 1))


def test_kept_concat_of_linear_outputs_not_2d():
    model = with_statistics(TokenConcat())
    x = random_input(2, 4, 4).double()
    assert "Linear outputs that are not 2-D" in kept_entry(assert_fold_exact(model, x, ["kept"])).reason
    # Folded anyway, each Linear's slice would scale its features, not the tokens the BN normalises.
    m = float64_copy(model)
    s, t = bn_affine(m.bn)
    parts = [
        F.linear(x, *fold_math.scale_output_channels(fc.weight, fc.bias, s[i : i + 4], t[i : i + 4]))
        for fc, i in ((m.fa, 0), (m.fb, 4))
    ]
    assert_wrong(run(m, x)[0], torch.cat(parts, 1))


# ------------------------------------------------------------------------------ ONNX layer
def test_onnx_export_of_concat_folds(tmp_path):
    model = with_statistics(nn.Sequential(MixedKernels(), nn.ReLU(), DenseLayer(cin=6)))
    assert_onnx_matches(model, random_input(2, 6, 8, 8), tmp_path / "model.onnx")


class ThreeKernels(nn.Module):
    """MixNet with three groups of unequal widths (2, 3, 4 output channels): each conv takes its
    own slice of the batch-norm, at its own offset."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 3, 5, padding=2), nn.Conv2d(2, 4, 1, bias=False)]
        )
        self.bn = nn.BatchNorm2d(9)

    def forward(self, x):
        parts = torch.split(x, [2, 2, 2], dim=1)
        return self.bn(torch.cat([conv(p) for conv, p in zip(self.convs, parts)], dim=1))


def test_a_three_way_concat_of_unequal_widths_folds_each_slice_at_its_offset():
    result = fold_checked(with_statistics(ThreeKernels()), random_input(2, 6, 7, 5), ["folded"])
    assert result.report.entries[0].into == "convs.0, convs.1, convs.2"
