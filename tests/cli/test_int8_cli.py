"""INT8 from the command line: `bnfold export --int8` prints and writes the INT8 report,
`bnfold verify` judges the INT8 file by its stored budget, `bnfold predict` runs it unchanged,
`bnfold inspect` says it is INT8."""

from __future__ import annotations

import json

import numpy as np
import torch
from bnfold.cli.main import main
from click.testing import CliRunner
from torch import nn


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_export_verify_and_predict_an_int8_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    torch.jit.save(torch.jit.trace(model.eval(), torch.zeros(1, 3, 6, 6)), str(tmp_path / "m.pt"))
    x = np.random.default_rng(0).standard_normal((60, 3, 6, 6)).astype(np.float32)
    np.save(tmp_path / "cal.npy", x[:40])
    np.save(tmp_path / "held.npy", x[40:])
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"

    args = ["export", tmp_path / "m.pt", "--input-shape", "1x3x6x6", "-o", out, "--report", report]
    result = invoke(*args, "--int8", "--calibration", tmp_path / "cal.npy", "--calibration-method", "percentile")
    assert result.exit_code == 0, result.output
    assert "INT8 check PASSED" in result.stdout and "percentile, 20 sample(s)" in result.stdout
    assert result.stderr == ""  # ONNX Runtime's quantization tool prints nothing of its own
    int8 = json.loads(report.read_text())["int8"]
    assert int8["passed"] and int8["calibration_samples"] == int8["verification_samples"] == 20
    assert [layer["status"] for layer in int8["layers"]] == ["int8", "int8"] and int8["int8_bytes"] > 0

    verified = invoke("verify", tmp_path / "m.pt", out, "--inputs", tmp_path / "held.npy")
    assert verified.exit_code == 0, verified.output
    assert "INT8 check PASSED" in verified.stdout and "on 20 held-out sample(s)" in verified.stdout
    refused = invoke("verify", tmp_path / "m.pt", out)
    assert refused.exit_code == 2 and "is an INT8 model: give --inputs" in refused.stderr

    predicted = invoke("predict", out, tmp_path / "held.npy", "--json")
    assert predicted.exit_code == 0, predicted.output
    assert len(predicted.stdout.splitlines()) == 20

    inspected = invoke("inspect", out)
    assert inspected.exit_code == 0, inspected.output
    assert "weights: INT8 (QDQ; percentile calibration on 20 sample(s); 0 layer(s) left in float" in inspected.stdout
    assert "fold: 1 batch-norm(s), 1 folded, 0 kept" in inspected.stdout
    as_json = json.loads(invoke("inspect", out, "--json").stdout)
    assert as_json["weight_dtype"] == "int8" and as_json["int8"]["verification_samples"] == 20
    float_model = tmp_path / "f.onnx"
    assert invoke("export", tmp_path / "m.pt", "--input-shape", "1x3x6x6", "-o", float_model).exit_code == 0
    assert "weights: float32" in invoke("inspect", float_model).stdout
