"""A shipped trained sample model exported to INT8 on its own test set: top-1 agreement with the
float32 PyTorch model and accuracy on the held-out half, the report's fields, the metadata, and
the Predictor running the INT8 model unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch

import bnfold
from bnfold.metadata import INT8_KEY, WEIGHT_DTYPE_KEY
from bnfold.quantization.calibration import split_indices
from bnfold.report import INT8
from bnfold.user_module import run_eval

SAMPLE = Path(__file__).resolve().parents[2] / "sample_models" / "digits_cnn"
# The issue's targets, the tests' own: agreement with the float32 model, accuracy given up.
MIN_AGREEMENT = 0.99
MAX_ACCURACY_DROP = 0.01
MAX_SIZE_RATIO = 0.5  # a model this small carries the QDQ nodes' scales too; ResNets reach 0.25


def test_digits_cnn_int8_keeps_its_accuracy_and_reports_every_field(tmp_path):
    loaded = bnfold.load_model(SAMPLE / "model.pt")
    test = np.load(SAMPLE / "test.npz")
    result = bnfold.export(
        loaded.module, loaded.example_inputs(), tmp_path / "m.onnx", int8=True, calibration=SAMPLE / "test.npz"
    )
    report = result.int8_report
    _, held_out = split_indices(len(test["y"]), None)
    assert report.passed and report.verification_samples == len(held_out) == 180
    assert report.calibration_method == "minmax" and report.calibration_samples == 180
    (output,) = report.outputs
    assert output.top1_agreement >= MIN_AGREEMENT and output.sqnr_db >= report.min_sqnr_db
    assert output.max_rel_error > 0 and all(layer.status == INT8 for layer in report.layers) and report.layers
    assert report.int8_bytes <= MAX_SIZE_RATIO * report.fp32_bytes

    x, y = test["x"][held_out], test["y"][held_out]
    fp32 = run_eval(loaded.module, [torch.from_numpy(x)])[0].numpy().argmax(1)
    predictor = bnfold.Predictor(result.path, device="cpu")
    int8 = predictor.predict(x).argmax(1)
    assert (fp32 == y).mean() - (int8 == y).mean() <= MAX_ACCURACY_DROP
    assert predictor.int8["calibration_samples"] == 180 and predictor.int8["top1_agreement"]["output"] >= MIN_AGREEMENT

    props = {p.key: p.value for p in onnx.load(result.path).metadata_props}
    assert props[WEIGHT_DTYPE_KEY] == "int8" and json.loads(props[INT8_KEY])["float_layers"] == []
    data = json.loads(json.dumps(result.to_dict()))
    assert data["int8"]["passed"] and data["int8"]["outputs"][0]["sqnr_db"] == output.sqnr_db
    text = str(result)
    assert "INT8 check PASSED" in text and "minmax, 180 sample(s)" in text and "MB INT8" in text
