"""INT8 export within the accuracy budget: checked against PyTorch on held-out data, the most
sensitive layer left in float when the budget is missed, nothing written when it still is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bnfold
from bnfold.report import FLOAT, INT8

# The tests' own bounds: the fallback must win back at least this much SQNR on the outlier model,
# whose lost input channel costs far more (measured: 15.7 dB quantized, 43.6 dB with its first
# conv in float).
RECOVERED_DB = 20.0
MIN_SQNR_DB = 20.0


def outlier_model() -> nn.Module:
    """Input normalisation whose third channel has a variance of 1e-4, folded into the first conv:
    that conv's weights for the channel are 100x the others, and the input channel itself is 100x
    smaller than the others, so per-tensor uint8 input levels (and per-channel int8 weights) lose it."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.BatchNorm2d(3),
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 4),
    )
    with torch.no_grad():
        model[0].running_var.copy_(torch.tensor([1.0, 1.0, 1e-4]))
        model[0].running_mean.zero_()
        model[4].running_var.uniform_(0.5, 2)
        model[4].running_mean.uniform_(-0.5, 0.5)
    return model.eval()


def outlier_data(samples: int = 80) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((samples, 3, 6, 6)).astype(np.float32)
    x[:, 2] *= 0.01  # what the batch-norm's statistics say: the channel's scale is 0.01
    return x


def export_outlier(path, **fields) -> bnfold.ExportResult:
    x = outlier_data()
    return bnfold.export(outlier_model(), (torch.from_numpy(x[:1]),), path, int8=True, calibration=x, **fields)


def test_a_layer_that_quantizes_badly_fails_the_budget_without_the_fallback(tmp_path):
    with pytest.raises(bnfold.VerificationError, match=r"misses the accuracy budget.*SQNR") as raised:
        export_outlier(tmp_path / "m.onnx", int8_max_float_layers=0)
    report = raised.value.report
    assert not report.passed and report.outputs[0].sqnr_db < MIN_SQNR_DB
    assert all(layer.status == INT8 for layer in report.layers)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left


def test_the_fallback_leaves_the_sensitive_layer_in_float_and_says_why(tmp_path):
    result = export_outlier(tmp_path / "m.onnx")
    report = result.int8_report
    assert report.passed and report.outputs[0].sqnr_db >= MIN_SQNR_DB
    first, *rest = report.layers
    assert (first.name, first.status) == ("1", FLOAT) and "accuracy budget" in first.reason
    assert first.sensitivity_db > RECOVERED_DB and all(layer.status == INT8 for layer in rest)
    assert len(report.attempts) == 2 and report.attempts[-1].startswith("1 in float")
    assert "float gain dB" in str(report) and "accuracy budget" in str(report)
    assert bnfold.Predictor(result.path, device="cpu").int8["float_layers"] == ["1"]


def test_an_int8_export_of_a_model_with_nothing_to_quantize_writes_nothing(tmp_path):
    x = np.random.default_rng(0).standard_normal((40, 3, 4, 4)).astype(np.float32)
    with pytest.raises(bnfold.UsageError, match="nothing to quantize") as raised:
        bnfold.export(nn.ReLU(), (torch.from_numpy(x[:1]),), tmp_path / "m.onnx", int8=True, calibration=x)
    assert raised.value.params()[0] == bnfold.Param("int8", True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (outlier_data()[:, :, :4, :4], "has shape (80, 3, 4, 4); the model takes"),
        (outlier_data(30), "30 sample(s) are too few"),
    ],
    ids=["shape", "too-few"],
)
def test_bad_calibration_data_is_one_line_and_writes_nothing(tmp_path, data, message):
    np.save(tmp_path / "cal.npy", data)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(bnfold.UsageError) as raised:
        bnfold.export(
            outlier_model(),
            (torch.from_numpy(outlier_data(1)),),
            out / "m.onnx",
            int8=True,
            calibration=tmp_path / "cal.npy",
        )
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert list(out.iterdir()) == []


def test_int8_of_a_float16_model_is_refused_before_folding(tmp_path):
    model = nn.Conv2d(3, 4, 1).half()
    with pytest.raises(bnfold.UsageError, match=r"quantizes a float32 model; this one is torch\.float16"):
        bnfold.export(model, (torch.zeros(1, 3, 4, 4),), tmp_path / "m.onnx", int8=True, calibration=outlier_data())
    assert list(tmp_path.iterdir()) == []
