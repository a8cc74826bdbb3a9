"""Input side: BN -> Conv/ConvTranspose/Linear folds into the following layer, also through
reflect/replicate/circular padding, exactly (float64, per channel); each guard of the rule keeps a
batch-norm that folding would get wrong."""

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
    zero_shift,
)
from helpers import random_input
from torch import nn

from bnfold.folding import math as fold_math

RULES = ("bn_conv",)  # applied alone: see conftest.py


# ---------------------------------------------------------------------------------- folded
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
def test_bn_then_conv_without_padding(conv, shape):
    bn = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)](4)
    result = fold_checked(with_statistics(nn.Sequential(bn, conv)), random_input(*shape), ["folded"])
    assert "input side" in result.report.entries[0].pattern


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_bn_then_conv_with_affine_commuting_padding(mode):
    model = with_statistics(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode)))
    result = fold_checked(model, random_input(2, 3, 8, 8), ["folded"])
    assert f"{mode} padding" in result.report.entries[0].pattern


class BNThenConv(nn.Module):
    """A batch-norm on the input, then a conv with ``padding="same"``."""

    def __init__(self, kernel: int = 3) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, kernel, padding="same")

    def forward(self, x):
        return self.conv(self.bn(x))


def test_bn_with_zero_shift_then_zero_padded_conv_is_folded():
    model = with_statistics(BNThenConv())
    zero_shift(model.bn)
    fold_checked(model, random_input(2, 3, 8, 8), ["folded"])


def test_bn_with_a_shift_then_1x1_conv_with_same_padding_is_folded():
    """A 1x1 conv with ``padding="same"`` pads nothing, so the shift folds."""
    fold_checked(with_statistics(BNThenConv(kernel=1)), random_input(2, 3, 8, 8), ["folded"])


def test_bn_with_zero_shift_then_conv_transpose_is_folded():
    model = with_statistics(nn.Sequential(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)))
    zero_shift(model[0])
    fold_checked(model, random_input(2, 4, 5, 5), ["folded"])


def test_batchnorm1d_then_linear():
    model = with_statistics(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(6), nn.Linear(6, 3)))
    result = fold_checked(model, random_input(4, 6), ["folded"])
    assert result.report.entries[0].into == "2"


class PreActBlock(nn.Module):
    """Pre-activation residual block: BN -> ReLU -> Conv, BN -> ReLU -> Conv, plus the identity."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        out = self.conv1(torch.relu(self.bn1(x)))
        return x + self.conv2(torch.relu(self.bn2(out)))


@pytest.mark.rules("bn_conv", "conv_bn")  # bn2 follows conv1
def test_pre_activation_block():
    result = fold_checked(with_statistics(PreActBlock()), random_input(2, 4, 6, 6))
    entries = {e.name: e for e in result.report.entries}
    assert entries["bn1"].status == "kept" and "'relu'" in entries["bn1"].reason
    assert entries["bn2"].status == "folded" and entries["bn2"].into == "conv1"


# ------------------------------------------------------------- kept, and why folding would be wrong
def test_kept_zero_padding_with_a_non_zero_shift():
    model = with_statistics(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)))
    x = random_input(2, 3, 8, 8).double()
    assert "zero-pads its input" in kept_entry(assert_fold_exact(model, x, ["kept"])).reason
    m = float64_copy(model)
    w, b = fold_math.scale_input_channels(m[1].weight, m[1].bias, *bn_affine(m[0]))
    assert_wrong(run(m, x)[0], F.conv2d(x, w, b, padding=1))  # the borders see 0, not the shift


def test_kept_same_padding_with_a_non_zero_shift():
    model = with_statistics(BNThenConv())
    x = random_input(2, 3, 8, 8).double()
    assert "zero-pads its input" in kept_entry(assert_fold_exact(model, x, ["kept"])).reason
    m = float64_copy(model)
    w, b = fold_math.scale_input_channels(m.conv.weight, m.conv.bias, *bn_affine(m.bn))
    assert_wrong(run(m, x)[0], F.conv2d(x, w, b, padding="same"))


def test_kept_conv_transpose_after_a_non_zero_shift():
    model = with_statistics(nn.Sequential(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)))
    x = random_input(2, 4, 5, 5).double()
    assert "non-zero shift" in kept_entry(assert_fold_exact(model, x, ["kept"])).reason
    # Folded anyway as for a conv: each output would get the shift through every tap, but a strided
    # transposed conv reaches each output through only some of them.
    m = float64_copy(model)
    s, t = bn_affine(m[0])
    w, b = fold_math.scale_transposed_input_channels(m[1].weight, m[1].bias, s)
    groups, cin, cout_per_group = 2, w.shape[0], w.shape[1]
    per_input = m[1].weight.detach().sum(dim=(2, 3)) * t[:, None]  # [Cin, Cout/groups]
    shift = per_input.reshape(groups, cin // groups, cout_per_group).sum(dim=1).reshape(-1)
    assert_wrong(run(m, x)[0], F.conv_transpose2d(x, w, b + shift, stride=2, groups=groups))


def test_kept_batchnorm1d_on_3d_input_then_linear():
    model = with_statistics(nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 3)))
    x = random_input(2, 5, 5).double()
    assert "acts on the last dim" in kept_entry(assert_fold_exact(model, x, ["kept"])).reason
    m = float64_copy(model)
    w, b = fold_math.scale_input_channels(m[1].weight, m[1].bias, *bn_affine(m[0]))
    assert_wrong(run(m, x)[0], F.linear(x, w, b))


def test_kept_channel_mismatch_with_the_following_linear():
    model = with_statistics(nn.Sequential(nn.BatchNorm1d(5), nn.Linear(7, 3)))
    x = random_input(2, 5, 7).double()
    reason = kept_entry(assert_fold_exact(model, x, ["kept"])).reason
    assert "channel mismatch" in reason and "takes 7 channels" in reason
    # Folded anyway, the rewrite cannot even be formed: 5 scales for 7 input features.
    m = float64_copy(model)
    with pytest.raises(RuntimeError):
        fold_math.scale_input_channels(m[1].weight, m[1].bias, *bn_affine(m[0]))


# ------------------------------------------------------------------------------ ONNX layer
def test_onnx_export_of_input_side_folds(tmp_path):
    model = nn.Sequential(
        nn.BatchNorm2d(3),
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.BatchNorm2d(4),  # before a zero-padded conv, with a shift: kept
        nn.Conv2d(4, 2, 3, padding=1),
    )
    assert_onnx_matches(with_statistics(model), random_input(2, 3, 8, 8), tmp_path / "model.onnx")


# ------------------------------------------------------- zero padding on either side of its guard


class BNPadConv(nn.Module):
    """BN → (optional ``F.pad``) → conv with ``padding``."""

    def __init__(self, padding, pad: tuple[int, ...] | None = None, mode: str = "constant") -> None:
        super().__init__()
        self.pad, self.mode = pad, mode
        self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 6, (3, 1), padding=padding)

    def forward(self, x):
        y = self.bn(x)
        return self.conv(F.pad(y, self.pad, mode=self.mode) if self.pad else y)


def test_kept_before_a_conv_that_zero_pads_only_its_second_spatial_axis():
    model = with_statistics(BNPadConv(padding=(0, 1)))
    assert "zero-pads its input" in kept_entry(assert_fold_exact(model, random_input(2, 4, 7, 6), ["kept"])).reason


def test_kept_when_only_some_channels_have_a_zero_shift_before_a_zero_padded_conv():
    model = with_statistics(BNPadConv(padding=(1, 0)))
    with torch.no_grad():  # channel 0's shift is exactly zero, the others' are not
        model.bn.running_mean[0], model.bn.bias[0] = 0.0, 0.0
    assert "zero-pads its input" in kept_entry(assert_fold_exact(model, random_input(2, 4, 7, 6), ["kept"])).reason


@pytest.mark.parametrize("mode, status", [("constant", "kept"), ("reflect", "folded")])
def test_an_explicit_zero_pad_before_a_conv_is_not_a_reflect_pad(mode, status):
    model = with_statistics(BNPadConv(padding=0, pad=(1, 1, 1, 1), mode=mode))
    assert_fold_exact(model, random_input(2, 4, 7, 6), [status])


def test_kept_before_a_same_padded_conv_with_an_even_kernel():
    """``padding="same"`` with kernel 2 pads one side: zeros the shift would have changed."""
    model = with_statistics(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 2, padding="same")))
    assert "zero-pads its input" in kept_entry(assert_fold_exact(model, random_input(2, 3, 6, 5), ["kept"])).reason
