"""Re-parameterisable blocks written the way real model libraries write them (issue 12): in-place
sums in any order, sums that start from 0, several k×k branches plus a 1×1 and an identity BN,
eval-mode no-ops after the sum, an in-place activation producing the block input, conv-norm
wrappers with a functional batch-norm, and a batch-norm after the sum. Each block becomes one
conv, exactly: the folded graph equals the unmerged block channel by channel in float64."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fold_checks import assert_fold_exact, assert_onnx_matches, graph_ops, with_statistics
from helpers import onnx_batchnorms, random_input
from torch import nn

# The block rule merges branches whose batch-norms conv_bn folded first (it runs after the sites).
RULES = ("conv_bn", "multibranch")

C = 4


class ConvNorm(nn.Module):
    """A conv-norm wrapper with a functional batch-norm and a fused activation that is a no-op
    (timm's ``BatchNormAct2d`` with ``act_layer=None``)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(C)
        self.act = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        x = F.batch_norm(self.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return self.act(x)


class DropPath(nn.Module):
    """Stochastic depth: the identity in eval mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if not self.training else x * (torch.rand(x.shape[0], 1, 1, 1) > 0.1)


class InPlaceRepVGG(nn.Module):
    """``out = kxk(x); out += 1x1(x); out += bn(x)``, after an in-place ReLU, then drop_path."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(C, C, 1)
        self.rbr_dense = ConvNorm(3)
        self.rbr_1x1 = ConvNorm(1)
        self.rbr_identity = nn.BatchNorm2d(C)
        self.drop_path = DropPath()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.stem(x))
        out = self.rbr_dense(x)
        out += self.rbr_1x1(x)
        out += self.rbr_identity(x)
        return self.drop_path(out)


class MobileOneStyle(nn.Module):
    """Several kxk branches summed from 0, a 1x1 "scale" branch and an identity BN added first."""

    def __init__(self, branches: int = 3) -> None:
        super().__init__()
        self.identity = nn.BatchNorm2d(C)
        self.scale = ConvNorm(1)
        self.kxk = nn.ModuleList([ConvNorm(3) for _ in range(branches)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0
        out = out + self.identity(x)
        out = out + self.scale(x)
        for branch in self.kxk:
            out += branch(x)
        return F.relu(out)


class BatchNormAfterSum(nn.Module):
    """``bn(conv_a(x) + conv_b(x) + x)``: merge the branches, then fold the BN into the merged conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(C, C, 3, padding=1)
        self.conv_b = nn.Conv2d(C, C, 1)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv_a(x) + self.conv_b(x) + x)


def test_in_place_sums_after_an_in_place_activation_merge_into_one_conv():
    result = assert_fold_exact(with_statistics(InPlaceRepVGG()), random_input(2, C, 8, 8), ["folded"] * 3)
    assert graph_ops(result, "conv") == 2 and graph_ops(result, "add") == 0  # the stem and the merged block
    assert {e.into for e in result.report.entries} == {"rbr_dense.conv"}


def test_branches_summed_from_zero_in_any_order_merge_into_one_conv():
    result = assert_fold_exact(with_statistics(MobileOneStyle()), random_input(2, C, 8, 8), ["folded"] * 5)
    assert graph_ops(result, "conv") == 1 and graph_ops(result, "add") == 0


def test_a_batchnorm_after_the_sum_folds_into_the_merged_conv():
    result = assert_fold_exact(with_statistics(BatchNormAfterSum()), random_input(2, C, 8, 8), ["folded"])
    assert graph_ops(result, "conv") == 1 and graph_ops(result, "add") == 0
    assert result.report.entries[0].into == "conv_a"


class MobileOneBlock(nn.Module):
    """FastViT's MobileOne block without activation: an identity BN, an optional 1x1 "scale"
    conv-BN and ``branches`` depthwise kxk conv-BN branches, summed from the scale branch."""

    def __init__(self, branches: int, scale: bool) -> None:
        super().__init__()
        self.rbr_skip = nn.BatchNorm2d(C)
        self.rbr_scale = nn.Sequential(nn.Conv2d(C, C, 1, groups=C, bias=False), nn.BatchNorm2d(C)) if scale else None
        self.rbr_conv = nn.ModuleList(
            nn.Sequential(nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False), nn.BatchNorm2d(C))
            for _ in range(branches)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity_out = self.rbr_skip(x)
        scale_out = self.rbr_scale(x) if self.rbr_scale is not None else 0
        out = scale_out + identity_out
        for conv in self.rbr_conv:
            out += conv(x)
        return out


class RepMixer(nn.Module):
    """FastViT: ``x + layer_scale * (mixer(x) - norm(x))``, one depthwise conv once merged."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = MobileOneBlock(branches=0, scale=False)
        self.mixer = MobileOneBlock(branches=1, scale=True)
        self.layer_scale = nn.Parameter(torch.rand(C, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))


def test_subtraction_and_a_layer_scale_merge_into_one_depthwise_conv():
    result = assert_fold_exact(with_statistics(RepMixer()), random_input(2, C, 8, 8), ["folded"] * 5)
    assert graph_ops(result, "conv") == 1
    assert graph_ops(result, "add") == graph_ops(result, "sub") == graph_ops(result, "mul") == 0
    assert [e.kind for e in result.report.entries].count("layer scale") == 1
    assert {e.into for e in result.report.entries} == {"mixer.rbr_conv.0.0"}


def test_library_forms_export_with_no_batchnormalization_left_in_onnx(tmp_path):
    for i, block in enumerate((InPlaceRepVGG(), RepMixer(), BatchNormAfterSum())):
        assert_onnx_matches(with_statistics(block), random_input(2, C, 8, 8), tmp_path / f"m{i}.onnx")
        assert onnx_batchnorms(tmp_path / f"m{i}.onnx") == 0
