"""Constant per-channel affine maps that are not batch-norm ops (issue 12): FrozenBatchNorm2d
(``x * scale + shift`` from buffers), layer scales, per-channel shifts and input normalisation
fold under the same rules as a batch-norm; each is reported as its own kind. Exact in float64."""

from __future__ import annotations

import pytest
import torch
from fold_checks import (
    assert_fold_exact,
    assert_onnx_matches,
    assert_wrong,
    float64_copy,
    graph_ops,
    kept_entry,
    run,
    with_statistics,
)
from helpers import onnx_ops, random_input
from torch import nn

from bnfold.folding import math as fold_math


class FrozenBatchNorm2d(nn.Module):
    """torchvision's: batch-norm statistics as buffers, applied with element-wise ops."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        gen = torch.Generator().manual_seed(n)
        self.register_buffer("weight", torch.rand(n, generator=gen) + 0.5)
        self.register_buffer("bias", torch.randn(n, generator=gen))
        self.register_buffer("running_mean", torch.randn(n, generator=gen))
        self.register_buffer("running_var", torch.rand(n, generator=gen) + 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.reshape(1, -1, 1, 1), self.bias.reshape(1, -1, 1, 1)
        rv, rm = self.running_var.reshape(1, -1, 1, 1), self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


class LayerScale(nn.Module):
    def __init__(self, n: int, dims: int = 4) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(n, *([1] * (dims - 2))) + 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * x


class FrozenResNetBlock(nn.Module):
    """A detection-backbone block: conv-FrozenBN pairs and a residual add."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), FrozenBatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), FrozenBatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class Normalised(nn.Module):
    """``(x - mean) / std`` in front of the first conv."""

    def __init__(self, padding: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 4, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv((x - self.mean) / self.std)


def test_frozen_batchnorm_after_a_conv_folds_and_no_mul_or_add_is_left():
    result = assert_fold_exact(nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4)), random_input(2, 3, 6, 6))
    [entry] = result.report.entries
    assert (entry.status, entry.kind, entry.op, entry.into) == ("folded", "FrozenBatchNorm2d", "affine", "0")
    assert graph_ops(result, "mul") == graph_ops(result, "add") == 0


def test_frozen_resnet_block_keeps_only_the_residual_add_in_onnx(tmp_path):
    block = FrozenResNetBlock()
    result = assert_fold_exact(block, random_input(2, 4, 6, 6), ["folded", "folded"])
    assert graph_ops(result, "mul") == 0 and graph_ops(result, "add") == 1
    assert_onnx_matches(block, random_input(2, 4, 6, 6), tmp_path / "m.onnx")
    assert onnx_ops(tmp_path / "m.onnx", "Mul") == 0 and onnx_ops(tmp_path / "m.onnx", "Add") == 1


def test_layer_scale_after_a_conv_and_after_a_linear_folds():
    conv = assert_fold_exact(nn.Sequential(nn.Conv2d(3, 4, 1), LayerScale(4)), random_input(2, 3, 5, 5))
    linear = assert_fold_exact(nn.Sequential(nn.Linear(6, 4), LayerScale(4, dims=2)), random_input(3, 6))
    for result in (conv, linear):
        [entry] = result.report.entries
        assert (entry.status, entry.kind) == ("folded", "layer scale")


def test_frozen_batchnorm_then_a_layer_scale_both_fold_into_the_conv():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), LayerScale(4))
    result = assert_fold_exact(model, random_input(2, 3, 6, 6), ["folded", "folded"])
    assert [e.kind for e in result.report.entries] == ["FrozenBatchNorm2d", "layer scale"]


def test_frozen_batchnorm_composes_into_a_following_batchnorm():
    model = with_statistics(nn.Sequential(nn.ReLU(), FrozenBatchNorm2d(3), nn.BatchNorm2d(3), nn.ReLU()))
    result = assert_fold_exact(model, random_input(2, 3, 5, 5), ["folded", "kept"])
    assert result.report.entries[0].into == "2"


def test_input_normalisation_folds_into_an_unpadded_first_conv():
    result = assert_fold_exact(Normalised(padding=0), random_input(2, 3, 6, 6), ["folded"])
    assert result.report.entries[0].kind == "input normalisation"
    assert graph_ops(result, "sub") == graph_ops(result, "div") == 0


def test_kept_input_normalisation_before_a_zero_padded_conv_and_folding_anyway_would_be_wrong():
    model = Normalised(padding=1)
    x = random_input(2, 3, 6, 6).double()
    result = assert_fold_exact(model, x, ["kept"])
    assert "zero-pads its input" in kept_entry(result).reason
    m64 = float64_copy(model)
    s, t = 1 / m64.std.reshape(-1), -m64.mean.reshape(-1) / m64.std.reshape(-1)
    w, b = fold_math.scale_input_channels(m64.conv.weight, m64.conv.bias, s, t, 1)
    naive = torch.nn.functional.conv2d(x, w, b, padding=1)
    assert_wrong(run(m64, x)[0], naive)


def test_a_constant_that_varies_along_another_axis_is_no_affine_site():
    class RowScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.register_buffer("rows", torch.rand(1, 1, 5, 1) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) * self.rows

    result = assert_fold_exact(RowScale(), random_input(2, 3, 5, 5), [])
    assert graph_ops(result, "mul") == 1


def test_frozen_batchnorm_after_an_activation_is_kept_with_its_reason():
    result = assert_fold_exact(
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), FrozenBatchNorm2d(4)), random_input(2, 3, 5, 5)
    )
    [entry] = result.report.entries
    assert entry.status == "kept" and entry.category == "after relu"


class Scaled(nn.Module):
    """conv → BN → a layer scale written as users write it."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        dtype = torch.float64 if how == "float64" else torch.float32
        self.gamma = nn.Parameter(torch.rand(4, dtype=dtype) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        if self.how == "in place":  # timm's LayerScale(inplace=True)
            return y.mul_(self.gamma[:, None, None])
        return self.gamma[:, None, None] * y


def test_a_layer_scale_indexed_from_its_parameter_is_named_after_it():
    result = assert_fold_exact(with_statistics(Scaled("indexed")), random_input(2, 3, 5, 5), ["folded", "kept"])
    assert (result.report.entries[1].name, result.report.entries[1].kind) == ("gamma", "layer scale")


def test_a_layer_scale_written_in_place_is_reported_and_kept():
    result = assert_fold_exact(with_statistics(Scaled("in place")), random_input(2, 3, 5, 5), ["folded", "kept"])
    assert "written in place" in kept_entry(result).reason and kept_entry(result).kind == "layer scale"


def test_a_float64_layer_scale_on_a_float32_model_is_reported_and_kept():
    from bnfold.folding import fold

    model, x = with_statistics(Scaled("float64")), random_input(2, 3, 5, 5)
    model.conv.float(), model.bn.float()
    result = fold(model, (x,))
    assert [e.status for e in result.report.entries] == ["folded", "kept"]
    assert "would change the output dtype" in kept_entry(result).reason
    assert run(result.module, x)[0].dtype == torch.float64


# ------------------------------------------- operand order, scalar-like constants, c - x, c / x


class ConvThen(nn.Module):
    """conv → ``op(self, y)`` with a buffer ``c`` of shape ``shape``."""

    def __init__(self, op, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.op, self.conv = op, nn.Conv2d(3, 4, 3)
        gen = torch.Generator().manual_seed(7)
        self.register_buffer("c", torch.rand(shape, generator=gen) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(self, self.conv(x))


@pytest.mark.parametrize(
    "op, shape",
    [
        (lambda m, y: m.c - y, (1, 4, 1, 1)),  # c - x: s = -1, t = c
        (lambda m, y: y * m.c, ()),  # a 0-dim constant broadcasts to every channel
        (lambda m, y: y * m.c, (1,)),
        (lambda m, y: (y - m.c) / m.c, (4, 1, 1)),
    ],
    ids=["c - x", "0-dim scale", "[1] scale", "(x - c) / c"],
)
def test_an_affine_map_in_every_operand_order_and_broadcast_folds_into_the_conv(op, shape):
    result = assert_fold_exact(ConvThen(op, shape).eval(), random_input(2, 3, 5, 5), ["folded"])
    assert graph_ops(result, "sub") + graph_ops(result, "mul") + graph_ops(result, "div") == 0


def test_a_constant_divided_by_the_activation_is_no_affine_map():
    """``c / x`` is not ``x / c``: no site, and the division stays."""
    result = assert_fold_exact(ConvThen(lambda m, y: m.c / y, (1, 4, 1, 1)).eval(), random_input(2, 3, 5, 5), [])
    assert graph_ops(result, "div") == 1


def test_a_constant_with_a_batch_axis_of_its_own_is_no_affine_map():
    """``y * c`` with ``c`` of shape ``[2, C, 1, 1]`` on a batch of 2: per sample, not per channel."""
    model = ConvThen(lambda m, y: y * m.c, (2, 4, 1, 1)).eval()
    result = assert_fold_exact(model, random_input(2, 3, 5, 5), [], dynamic_batch=False)
    assert graph_ops(result, "mul") == 1


@pytest.mark.parametrize("op", [torch.add, torch.sub], ids=["add", "sub"])
def test_an_add_or_sub_with_alpha_is_no_affine_map(op):
    """``add(y, c, alpha=3)`` is ``y + 3c``: read as a shift of ``c``, it would fold the wrong
    shift (the float64 proof would undo it, which ``assert_fold_exact`` also fails on)."""
    model = ConvThen(lambda m, y: op(y, m.c, alpha=3.0), (1, 4, 1, 1)).eval()
    x = random_input(2, 3, 5, 5)
    result = assert_fold_exact(model, x, [])
    assert graph_ops(result, op.__name__) == 1
    m = float64_copy(model)
    y = m.conv(x.double())
    assert_wrong(op(y, m.c, alpha=3.0), op(y, m.c))  # the shift without alpha
