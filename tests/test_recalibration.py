"""Recalibration: exact population statistics of each batch-norm input, nothing else touched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from bnfold.cli.main import main
from click.testing import CliRunner
from helpers import randomize_batchnorms
from torch import nn

import bnfold


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.conv2, self.bn2 = nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4)
        self.seen_dropout_modes: list[bool] = []
        self.drop.register_forward_pre_hook(lambda m, _: self.seen_dropout_modes.append(m.training))

    def forward(self, x):
        y = self.drop(torch.relu(self.bn1(self.conv1(x))))
        return self.bn2(self.conv2(y))


def data(n: int = 50) -> np.ndarray:
    return (np.random.default_rng(0).standard_normal((n, 3, 8, 8)) * 2 + 1).astype(np.float32)


def population(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v = t.double().transpose(0, 1).reshape(t.shape[1], -1)
    return v.mean(1), v.var(1, unbiased=True)


def test_statistics_equal_a_direct_computation():
    model = randomize_batchnorms(Net())
    x = torch.from_numpy(data())
    report = bnfold.recalibrate(model, x.numpy(), batch_size=len(x))  # one batch: bn2's input is well defined
    with torch.no_grad():
        h1 = model.conv1(x)
        m1, v1 = population(h1)
        # In train-statistics mode bn1 normalises with the batch's own (biased) statistics.
        normed = torch.nn.functional.batch_norm(
            h1, None, None, model.bn1.weight, model.bn1.bias, training=True, eps=model.bn1.eps
        )
        m2, v2 = population(model.conv2(torch.relu(normed)))
    torch.testing.assert_close(model.bn1.running_mean.double(), m1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn1.running_var.double(), v1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn2.running_mean.double(), m2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn2.running_var.double(), v2, rtol=1e-5, atol=1e-6)
    assert [layer.name for layer in report.layers] == ["bn1", "bn2"]


def test_batching_does_not_change_the_first_layer_statistics():
    """bn1's input does not depend on other batch-norms: any batch size gives the exact result."""
    x = data(53)  # 53 = 10 * 5 + 3, and with batch 13 a last batch of 1 is merged
    a, b = randomize_batchnorms(Net()), randomize_batchnorms(Net())
    b.load_state_dict(a.state_dict())
    assert bnfold.recalibrate(a, x, batch_size=53).batches == 1
    assert bnfold.recalibrate(b, x, batch_size=13).batches == 4  # 13, 13, 13, 13 + 1
    torch.testing.assert_close(a.bn1.running_mean, b.bn1.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.bn1.running_var, b.bn1.running_var, rtol=1e-6, atol=1e-6)


def test_only_running_statistics_change_and_dropout_stays_in_eval():
    model = randomize_batchnorms(Net())
    model.train()  # the caller's modes are restored afterwards
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bnfold.recalibrate(model, data(), batch_size=16)
    after = model.state_dict()
    for key in before:
        changed = not torch.equal(before[key], after[key])
        assert changed == (key.endswith("running_mean") or key.endswith("running_var")), key
    assert model.seen_dropout_modes and not any(model.seen_dropout_modes)
    assert all(m.training for m in model.modules())


def test_torchscript_cannot_be_recalibrated():
    scripted = torch.jit.trace(randomize_batchnorms(Net()), torch.from_numpy(data(2)))
    with pytest.raises(bnfold.UsageError, match=r"`recalibrate` needs the model's Python classes.*`arch`"):
        bnfold.recalibrate(scripted, data())


@pytest.mark.parametrize(
    "model, kwargs, match",
    [
        (Net(), dict(batch_size=1), r"`batch_size` must be at least 2 \(got 1\)"),
        (nn.Conv2d(3, 3, 1), {}, "`recalibrate`: the model has no batch-norm layer"),
        (Net(), dict(data=data(1)), "`recalibrate`: needs at least 2 samples"),
        (Net(), dict(data="missing.npy"), "`recalibrate` missing.npy: file does not exist"),
    ],
    ids=["batch-size", "no-batch-norm", "one-sample", "missing-file"],
)
def test_usage_errors_name_the_parameter(model, kwargs, match):
    with pytest.raises(bnfold.UsageError, match=match):
        bnfold.recalibrate(model, **{"data": data(), **kwargs})


def test_cli_names_the_recalibration_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    model, arch = "sample_models/signal_cnn/model.pt", "sample_models/architectures.py:signal_net"
    args = ["export", model, "--arch", arch, "-o", str(tmp_path / "s.onnx")]
    result = CliRunner().invoke(
        main, [*args, "--recalibrate", "sample_models/signal_cnn/test.npz", "--recalibrate-batch-size", "1"]
    )
    assert result.exit_code == 2
    assert "error: --recalibrate-batch-size must be at least 2 (got 1)" in result.stderr
    result = CliRunner().invoke(main, [*args, "--recalibrate", "missing.npz"])
    assert result.exit_code == 2 and "error: --recalibrate missing.npz: file does not exist" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_export_with_recalibration(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    report = tmp_path / "r.json"
    result = CliRunner().invoke(
        main,
        [
            "export",
            "sample_models/signal_cnn/model.pt",
            "--arch",
            "sample_models/architectures.py:signal_net",
            "-o",
            str(tmp_path / "s.onnx"),
            "--recalibrate",
            "sample_models/signal_cnn/test.npz",
            "--report",
            str(report),
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert "Recalibrated 3 batch-norm(s) on 400 sample(s)" in result.stdout and "Verification PASSED" in result.stdout
    layers = json.loads(report.read_text())["recalibration"]["layers"]
    assert len(layers) == 3 and all(layer["values_per_channel"] > 400 for layer in layers)
