"""Output side: Conv{1,2,3}d, ConvTranspose{1,2,3}d and Linear -> BN fold into the layer's weights,
exactly (float64, per channel); each guard of the rule keeps a batch-norm that folding would get wrong."""

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

RULES = ("conv_bn",)  # applied alone: see conftest.py


# ---------------------------------------------------------------------------------- folded
@pytest.mark.parametrize(
    "conv, bn, shape",
    [
        (nn.Conv1d(3, 8, 5, stride=2, dilation=2, padding=3), nn.BatchNorm1d(8), (2, 3, 32)),
        (nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), (2, 3, 12, 12)),
        (nn.Conv3d(2, 6, 3, stride=(1, 2, 2), padding=1), nn.BatchNorm3d(6), (2, 2, 6, 8, 8)),
    ],
    ids=["conv1d-strided-dilated", "conv2d", "conv3d-strided"],
)
def test_conv_nd_then_bn(conv, bn, shape):
    result = fold_checked(with_statistics(nn.Sequential(conv, bn)), random_input(*shape), ["folded"])
    assert result.report.entries[0].into == "0"


def test_conv_without_bias():
    model = with_statistics(nn.Sequential(nn.Conv2d(4, 8, 3, bias=False), nn.BatchNorm2d(8)))
    fold_checked(model, random_input(2, 4, 9, 9), ["folded"])


def test_grouped_conv():
    model = with_statistics(nn.Sequential(nn.Conv2d(6, 12, 3, groups=3, padding=2, dilation=2), nn.BatchNorm2d(12)))
    fold_checked(model, random_input(2, 6, 10, 10), ["folded"])


def test_depthwise_conv():
    model = with_statistics(nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, groups=8, bias=False), nn.BatchNorm2d(8)))
    fold_checked(model, random_input(2, 8, 11, 11), ["folded"])


def test_conv_with_reflect_padding_mode():
    model = with_statistics(nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(5)))
    fold_checked(model, random_input(2, 3, 8, 8), ["folded"])


@pytest.mark.parametrize(
    "deconv, bn, shape",
    [
        (nn.ConvTranspose1d(4, 6, 3, stride=2), nn.BatchNorm1d(6), (2, 4, 10)),
        (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, output_padding=1), nn.BatchNorm2d(6), (2, 4, 5, 5)),
        (nn.ConvTranspose3d(3, 6, 2, stride=2, groups=3, bias=False), nn.BatchNorm3d(6), (2, 3, 3, 4, 4)),
    ],
    ids=["convT1d", "convT2d-groups2", "convT3d-groups3-nobias"],
)
def test_conv_transpose_then_bn(deconv, bn, shape):
    result = fold_checked(with_statistics(nn.Sequential(deconv, bn)), random_input(*shape), ["folded"])
    assert "ConvTranspose" in result.report.entries[0].pattern


def test_linear_then_batchnorm1d_2d():
    model = with_statistics(nn.Sequential(nn.Linear(10, 7), nn.BatchNorm1d(7)))
    result = fold_checked(model, random_input(4, 10), ["folded"])
    assert result.report.entries[0].pattern.startswith("Linear")


def test_batchnorm_without_affine():
    model = with_statistics(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False)))
    fold_checked(model, random_input(2, 3, 5, 5), ["folded"])


class SharedConv(nn.Module):
    """One conv called at two sites; only the first is followed by a batch-norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x * 2)


def test_conv_called_at_several_sites_is_copied_not_modified():
    model = with_statistics(SharedConv())
    before = model.conv.weight.detach().clone()
    result = fold_checked(model, random_input(2, 3, 6, 6), ["folded"])
    assert "other call sites keep the originals" in result.report.entries[0].pattern
    assert torch.equal(model.conv.weight, before)


class FunctionalBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.gamma = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, None, training=False, eps=1e-3)


def test_functional_batch_norm_on_buffers():
    fold_checked(FunctionalBN().eval(), random_input(2, 3, 6, 6), ["folded"])


# ------------------------------------------------------------- kept, and why folding would be wrong
class SharedProducer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_kept_conv_output_with_other_readers():
    model = with_statistics(SharedProducer())
    x = random_input(2, 3, 6, 6).double()
    reason = kept_entry(assert_fold_exact(model, x, ["kept"])).reason
    assert "also used by 1 other op" in reason and "conv" in reason
    # Folded anyway, the other reader would see the normalised tensor too.
    m = float64_copy(model)
    w, b = fold_math.scale_output_channels(m.conv.weight, m.conv.bias, *bn_affine(m.bn))
    y = F.conv2d(x, w, b, padding=1)
    assert_wrong(run(m, x)[0], y + y)


class Linear3D(nn.Module):
    """Linear over the last dim, BatchNorm1d over dim 1; both of size 5, so only the rank tells."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_kept_linear_then_batchnorm1d_on_3d_input():
    model = with_statistics(Linear3D())
    x = random_input(2, 5, 5).double()
    assert "3-D" in kept_entry(assert_fold_exact(model, x, ["kept"])).reason
    m = float64_copy(model)
    w, b = fold_math.scale_output_channels(m.fc.weight, m.fc.bias, *bn_affine(m.bn))
    assert_wrong(run(m, x)[0], F.linear(x, w, b))


class LinearTokens(nn.Module):
    """Linear(6 -> 5) on [N, 7, 6], then BatchNorm1d(7) over the 7 tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(7)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_kept_channel_mismatch_between_linear_and_batchnorm():
    model = with_statistics(LinearTokens())
    x = random_input(2, 7, 6).double()
    reason = kept_entry(assert_fold_exact(model, x, ["kept"])).reason
    assert "channel mismatch" in reason and "5 outputs" in reason
    # Folded anyway, the rewrite cannot even be formed: 7 scales for 5 output features.
    m = float64_copy(model)
    with pytest.raises(RuntimeError):
        fold_math.scale_output_channels(m.fc.weight, m.fc.bias, *bn_affine(m.bn))


# ------------------------------------------------------------------------------ ONNX layer
def test_onnx_export_of_folded_conv_and_conv_transpose(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, groups=1, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 3, stride=2, groups=2),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.BatchNorm2d(4),  # after a ReLU: kept
    )
    assert_onnx_matches(with_statistics(model), random_input(2, 3, 6, 6), tmp_path / "model.onnx")
