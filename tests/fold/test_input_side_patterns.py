"""One test per input-side pattern (a batch-norm *before* a weight layer) and per BN -> BN
composition: folded where exact, kept with the reason where not."""

from __future__ import annotations

import pytest
import torch
from test_patterns import fold_and_export, kept_reason, statuses
from torch import nn


def zero_shift(bn: nn.BatchNorm2d) -> None:
    """Make t = beta - s * mean exactly zero."""
    bn.running_mean.zero_()
    bn.bias.data.zero_()


@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv2d(4, 6, 3), (2, 4, 9, 9)),
        (nn.Conv2d(4, 8, 3, stride=2, dilation=2, groups=2), (2, 4, 11, 11)),
        (nn.Conv2d(4, 4, 3, groups=4, bias=False), (2, 4, 7, 7)),
        (nn.Conv1d(4, 5, 5, stride=2), (2, 4, 20)),
        (nn.Conv3d(4, 3, 2), (2, 4, 4, 5, 5)),
    ],
    ids=["conv2d", "grouped-strided-dilated", "depthwise-nobias", "conv1d", "conv3d"],
)
def test_bn_then_conv_without_padding(conv, shape, tmp_path):
    bn = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)](4)
    folded = fold_and_export(nn.Sequential(bn, conv), shape, tmp_path)
    assert statuses(folded) == ["folded"]
    assert "input side" in folded.report.entries[0].pattern


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_bn_then_conv_with_affine_commuting_padding(mode, tmp_path):
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode))
    folded = fold_and_export(model, (2, 3, 8, 8), tmp_path)
    assert statuses(folded) == ["folded"] and f"{mode} padding" in folded.report.entries[0].pattern


def test_bn_then_zero_padded_conv_with_a_shift_is_kept(tmp_path):
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1))
    assert "zero-pads its input" in kept_reason(fold_and_export(model, (2, 3, 8, 8), tmp_path))


class ZeroShiftThenPaddedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3, padding="same")

    def forward(self, x):
        return self.conv(self.bn(x))


def test_bn_with_zero_shift_then_zero_padded_conv_is_folded(tmp_path):
    folded = fold_and_export(ZeroShiftThenPaddedConv(), (2, 3, 8, 8), tmp_path, prepare=lambda m: zero_shift(m.bn))
    assert statuses(folded) == ["folded"]


def test_bn_then_conv_transpose_with_a_shift_is_kept(tmp_path):
    model = nn.Sequential(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2))
    assert "non-zero shift" in kept_reason(fold_and_export(model, (2, 4, 5, 5), tmp_path))


def test_bn_with_zero_shift_then_conv_transpose_is_folded(tmp_path):
    model = nn.Sequential(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2))
    folded = fold_and_export(model, (2, 4, 5, 5), tmp_path, prepare=lambda m: zero_shift(m[0]))
    assert statuses(folded) == ["folded"]


def test_batchnorm1d_then_linear(tmp_path):
    folded = fold_and_export(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(6), nn.Linear(6, 3)), (4, 6), tmp_path)
    assert statuses(folded) == ["folded"] and folded.report.entries[0].into == "2"


def test_batchnorm1d_on_3d_input_then_linear_is_kept(tmp_path):
    model = nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 3))
    assert "acts on the last dim" in kept_reason(fold_and_export(model, (2, 5, 5), tmp_path))


def test_bn_bn_conv_chain_after_an_activation(tmp_path):
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1))
    folded = fold_and_export(model, (2, 3, 6, 6), tmp_path)
    assert statuses(folded) == ["folded", "folded"]
    assert folded.report.entries[0].into == "2" and "composed" in folded.report.entries[0].pattern
    assert folded.report.entries[1].into == "3"


def test_bn_bn_between_activations_composes_into_one_kept_op(tmp_path):
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.BatchNorm2d(3), nn.ReLU())
    folded = fold_and_export(model, (2, 3, 6, 6), tmp_path)
    assert statuses(folded) == ["folded", "kept"]


class PreActBlock(nn.Module):
    """Pre-activation residual block: BN -> ReLU -> Conv, BN -> ReLU -> Conv, plus the identity."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        out = self.conv1(torch.relu(self.bn1(x)))
        return x + self.conv2(torch.relu(self.bn2(out)))


def test_pre_activation_block(tmp_path):
    folded = fold_and_export(PreActBlock(), (2, 4, 6, 6), tmp_path)
    entries = {e.name: e for e in folded.report.entries}
    assert entries["bn1"].status == "kept" and "'relu'" in entries["bn1"].reason
    assert entries["bn2"].status == "folded" and entries["bn2"].into == "conv1"
