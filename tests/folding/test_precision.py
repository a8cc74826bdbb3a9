"""float16 export: fold first (float64), check every stored tensor fits, then convert."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from helpers import random_input, randomize_batchnorms
from onnx import numpy_helper
from torch import nn

import bnfold
from bnfold.folding import math as fold_math


def conv_bn() -> nn.Sequential:
    return randomize_batchnorms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)))


def test_fp16_weights_are_folded_in_float64_then_cast_once(tmp_path):
    model = conv_bn()
    result = bnfold.export(model, (random_input(1, 3, 8, 8),), tmp_path / "m.onnx", fp16=True)
    assert result.verify_report.passed and result.verify_report.rtol == 1e-2  # the documented float16 default
    s, t = fold_math.bn_scale_shift(
        model[1].running_mean, model[1].running_var, model[1].weight, model[1].bias, model[1].eps
    )
    w64, b64 = fold_math.scale_output_channels(model[0].weight, model[0].bias, s, t)
    # float64 -> float32 (the layer's dtype) -> float16: what bnfold promises, bit for bit.
    expected = {w64.float().half().numpy().tobytes(), b64.float().half().numpy().tobytes()}
    initializers = {
        numpy_helper.to_array(i).tobytes()
        for i in onnx.load(result.path).graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT16
    }
    assert expected <= initializers


@pytest.mark.parametrize("keep_io_types, dtype", [(False, np.float16), (True, np.float32)])
def test_fp16_io_types(keep_io_types, dtype, tmp_path):
    path = bnfold.export(
        conv_bn(), (random_input(1, 3, 8, 8),), tmp_path / "m.onnx", fp16=True, keep_io_types=keep_io_types
    ).path
    predictor = bnfold.Predictor(path, device="cpu")
    assert predictor.inputs[0].dtype == dtype and predictor.outputs[0].dtype == dtype
    assert predictor.predict(random_input(3, 3, 8, 8).numpy()).dtype == dtype


def test_fp16_overflow_names_the_layer_and_the_value(tmp_path):
    model = conv_bn()
    model[1].running_var.fill_(1e-6)
    model[1].eps = 1e-9
    model[1].weight.data.fill_(100.0)  # s = 1e5: fits float32, not float16
    with pytest.raises(
        bnfold.FoldError, match=r"the (weight|bias) of Conv2d '0' does not fit float16: .*largest magnitude"
    ):
        bnfold.export(model, (random_input(1, 3, 8, 8),), tmp_path / "m.onnx", fp16=True)
    assert list(tmp_path.iterdir()) == []


def test_fp16_overflow_on_the_negative_side_is_caught_too(tmp_path):
    """Every folded weight very negative, the largest one small: the range check is on magnitudes."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[0].weight.abs_().add_(0.1)  # all positive ...
        model[1].weight.fill_(-1000.0)  # ... times s = -1e6: all below -65504
        model[1].running_var.fill_(1e-6)
        model[1].eps = 1e-9
    with pytest.raises(bnfold.FoldError, match=r"does not fit float16: its largest magnitude is [0-9.]+e\+05"):
        bnfold.export(model, (random_input(1, 3, 8, 8),), tmp_path / "m.onnx", fp16=True)
    assert list(tmp_path.iterdir()) == []


def test_fp16_conversion_leaves_the_users_model_untouched(tmp_path):
    model = conv_bn()
    bnfold.export(model, (random_input(1, 3, 8, 8),), tmp_path / "m.onnx", fp16=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_keep_io_types_needs_fp16(tmp_path):
    with pytest.raises(bnfold.UsageError, match="`keep_io_types=True`"):
        bnfold.export(conv_bn(), (random_input(1, 3, 8, 8),), tmp_path / "m.onnx", keep_io_types=True)


class NearConstantChannels(nn.Module):
    """A channel with a large offset and a tiny variance: eager float32 cancels catastrophically."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4, eps=1e-12)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_float64_reference_shows_folding_adds_no_error_on_near_constant_channels(tmp_path):
    model = NearConstantChannels().eval()
    with torch.no_grad():
        model.conv.weight.mul_(1e-3)
        model.conv.bias.copy_(torch.tensor([100.0, -50.0, 3.0, 0.0]))
        model.bn.running_mean.copy_(model.conv.bias)
        model.bn.running_var.copy_(torch.tensor([1e-6, 1e-6, 1e-4, 1.0]))
    result = bnfold.export(model, (random_input(1, 3, 5, 5),), tmp_path / "m.onnx", reference="float64")
    check = result.verify_report.outputs[0]
    assert check.float64_rel_error_original is not None and check.float64_rel_error_onnx is not None
    # Eager float32 is itself inaccurate here (x - mean cancels); the folded model, whose scale and
    # shift were computed in float64, must be more accurate than it.
    assert check.float64_rel_error_original > 1e-6
    assert check.float64_rel_error_onnx < check.float64_rel_error_original


class LogitsAndIndex(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        logits = self.bn(self.conv(x)).mean((2, 3))
        return logits, logits.argmax(1)


def test_keep_io_types_keeps_integer_outputs_integer(tmp_path):
    model = randomize_batchnorms(LogitsAndIndex())
    path = bnfold.export(model, (random_input(1, 3, 8, 8),), tmp_path / "m.onnx", fp16=True, keep_io_types=True).path
    dtypes = [o.dtype for o in bnfold.Predictor(path, device="cpu").outputs]
    assert dtypes == [np.float32, np.int64]
