"""One test per folding pattern: folded (or kept with the right reason), the folded module and the
ONNX model match eval mode, and the ONNX graph has as many BatchNormalization nodes as reported."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_same_function,
    graph_batchnorm_ops,
    onnx_batchnorms,
    random_input,
    randomize_batchnorms,
)
from torch import nn

import bnfold


def fold_and_export(
    model: nn.Module, shape: tuple[int, ...], tmp_path, seed: int = 0, prepare=None
) -> bnfold.FoldResult:
    """Fold ``model`` (after random statistics and ``prepare(model)``), check it against eval mode,
    export + verify it; return the fold result."""
    model = randomize_batchnorms(model, seed)
    if prepare is not None:
        prepare(model)
    x = random_input(*shape)
    folded = bnfold.fold(model, (x,))
    assert_same_function(model, folded.module, x)
    assert_same_function(model, folded.module, random_input(5, *shape[1:], seed=2))
    assert graph_batchnorm_ops(folded) == folded.report.kept_count
    bn_sizes = sorted(m.num_features for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert not bn_sizes or sorted(e.channels for e in folded.report.entries) == bn_sizes
    result = bnfold.export(model, (x,), tmp_path / "model.onnx")
    assert result.verify_report.passed
    assert onnx_batchnorms(tmp_path / "model.onnx") == folded.report.kept_count == result.onnx_batchnorm_count
    return folded


def statuses(folded: bnfold.FoldResult) -> list[str]:
    return [e.status for e in folded.report.entries]


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
def test_conv_nd_then_bn(conv, bn, shape, tmp_path):
    folded = fold_and_export(nn.Sequential(conv, bn), shape, tmp_path)
    assert statuses(folded) == ["folded"]
    assert folded.report.entries[0].into == "0"


def test_conv_without_bias(tmp_path):
    folded = fold_and_export(nn.Sequential(nn.Conv2d(4, 8, 3, bias=False), nn.BatchNorm2d(8)), (2, 4, 9, 9), tmp_path)
    assert statuses(folded) == ["folded"]


def test_grouped_conv(tmp_path):
    model = nn.Sequential(nn.Conv2d(6, 12, 3, groups=3, padding=2, dilation=2), nn.BatchNorm2d(12))
    assert statuses(fold_and_export(model, (2, 6, 10, 10), tmp_path)) == ["folded"]


def test_depthwise_conv(tmp_path):
    model = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, groups=8, bias=False), nn.BatchNorm2d(8))
    assert statuses(fold_and_export(model, (2, 8, 11, 11), tmp_path)) == ["folded"]


def test_conv_with_reflect_padding_mode(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(5))
    assert statuses(fold_and_export(model, (2, 3, 8, 8), tmp_path)) == ["folded"]


@pytest.mark.parametrize(
    "deconv, bn, shape",
    [
        (nn.ConvTranspose1d(4, 6, 3, stride=2), nn.BatchNorm1d(6), (2, 4, 10)),
        (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, output_padding=1), nn.BatchNorm2d(6), (2, 4, 5, 5)),
        (nn.ConvTranspose3d(3, 6, 2, stride=2, groups=3, bias=False), nn.BatchNorm3d(6), (2, 3, 3, 4, 4)),
    ],
    ids=["convT1d", "convT2d-groups2", "convT3d-groups3-nobias"],
)
def test_conv_transpose_then_bn(deconv, bn, shape, tmp_path):
    folded = fold_and_export(nn.Sequential(deconv, bn), shape, tmp_path)
    assert statuses(folded) == ["folded"]
    assert "ConvTranspose" in folded.report.entries[0].pattern


def test_linear_then_batchnorm1d_2d(tmp_path):
    folded = fold_and_export(nn.Sequential(nn.Linear(10, 7), nn.BatchNorm1d(7)), (4, 10), tmp_path)
    assert statuses(folded) == ["folded"]
    assert folded.report.entries[0].pattern.startswith("Linear")


def test_batchnorm_without_affine(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False))
    assert statuses(fold_and_export(model, (2, 3, 5, 5), tmp_path)) == ["folded"]


def test_chain_conv_bn_bn(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    folded = fold_and_export(model, (2, 3, 7, 7), tmp_path)
    assert statuses(folded) == ["folded", "folded"]
    assert {e.into for e in folded.report.entries} == {"0"}


class SharedConv(nn.Module):
    """One conv called at two sites; only the first is followed by a batch-norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x * 2)


def test_conv_called_at_several_sites_is_copied_not_modified(tmp_path):
    model = SharedConv()
    before = model.conv.weight.detach().clone()
    folded = fold_and_export(model, (2, 3, 6, 6), tmp_path)
    assert statuses(folded) == ["folded"]
    assert "other call sites keep the originals" in folded.report.entries[0].pattern
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


def test_functional_batch_norm_on_buffers(tmp_path):
    folded = fold_and_export(FunctionalBN(), (2, 3, 6, 6), tmp_path)
    assert statuses(folded) == ["folded"]


# ------------------------------------------------------------------------------------ kept
def kept_reason(folded: bnfold.FoldResult) -> str:
    (entry,) = [e for e in folded.report.entries if e.status == "kept"]
    return entry.reason


def test_track_running_stats_false_is_kept(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    assert "batch statistics" in kept_reason(fold_and_export(model, (4, 3, 6, 6), tmp_path))


class SharedProducer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_producer_with_other_users_is_kept(tmp_path):
    reason = kept_reason(fold_and_export(SharedProducer(), (2, 3, 6, 6), tmp_path))
    assert "also used by 1 other op" in reason and "conv" in reason


class Linear3D(nn.Module):
    """Linear over the last dim, BatchNorm1d over dim 1; both of size 5, so only the rank tells."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_linear_then_batchnorm1d_on_3d_input_is_kept(tmp_path):
    assert "3-D" in kept_reason(fold_and_export(Linear3D(), (2, 5, 5), tmp_path))


def test_activation_between_conv_and_bn_is_kept(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    assert "'relu'" in kept_reason(fold_and_export(model, (2, 3, 6, 6), tmp_path))


def test_batchnorm_on_model_input_is_kept(tmp_path):
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(27, 2))
    assert "model input" in kept_reason(fold_and_export(model, (2, 3, 3, 3), tmp_path))


# ---------------------------------------------------------------------------------- errors
def _bn_model() -> nn.Module:
    return randomize_batchnorms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


@pytest.mark.parametrize(
    "buffer, value", [("running_mean", float("nan")), ("running_var", float("inf")), ("running_var", -0.5)]
)
def test_corrupt_statistics_are_an_error_naming_the_layer(buffer, value):
    model = _bn_model()
    getattr(model[1], buffer)[2] = value
    with pytest.raises(bnfold.FoldError, match=r"batch-norm '1'.*" + buffer):
        bnfold.fold(model, (random_input(2, 3, 6, 6),))


def test_fp16_overflow_is_an_error_naming_the_layers():
    model = _bn_model()
    model[1].running_var.fill_(1e-9)
    model[1].eps = 1e-12
    model[1].weight.data.fill_(1e3)
    model = model.half()
    with pytest.raises(bnfold.FoldError, match=r"batch-norm '1' into Conv2d '0'.*float16"):
        bnfold.fold(model, (random_input(2, 3, 6, 6).half(),))
