"""ExportOptions: one checked record of every export option, shared by the library and the CLI."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import bnfold
from bnfold.errors import Param
from bnfold.export_options import ExportOptions

CALIBRATION = np.zeros((40, 3, 4, 4), dtype=np.float32)


def test_defaults_are_bnfold_exports():
    options = ExportOptions()
    assert options.dynamic_batch and options.verify and not options.fp16 and options.reference == "float32"
    assert options.rtol is None and options.atol is None and options.rules is None


def test_sequences_are_kept_as_tuples():
    options = ExportOptions(labels=["a", "b"], rules=["conv_bn"], skip_rules=[])
    assert options.labels == ("a", "b") and options.rules == ("conv_bn",) and options.skip_rules == ()
    hash(options)  # frozen and hashable


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"keep_io_types": True}, Param("keep_io_types", True)),
        ({"rtol": -1e-3}, Param("rtol")),
        ({"atol": float("nan")}, Param("atol")),
        ({"reference": "float16"}, Param("reference")),
        ({"opset": 0}, Param("opset")),
        ({"rules": "conv_bn"}, Param("rules")),  # one string, not names
        ({"skip_rules": ["nonesuch"]}, Param("skip_rules")),
        ({"int8": True}, Param("int8", True)),  # no calibration data
        ({"calibration": CALIBRATION}, Param("calibration")),  # without int8
        ({"int8_max_float_layers": 0}, Param("int8_max_float_layers")),  # without int8
        ({"int8": True, "calibration": CALIBRATION, "fp16": True}, Param("int8", True)),
        ({"int8": True, "calibration": CALIBRATION, "verify": False}, Param("verify", False)),
        ({"int8": True, "calibration": "missing.npz"}, Param("calibration")),
        ({"int8": True, "calibration": CALIBRATION, "calibration_method": "kl"}, Param("calibration_method")),
        ({"int8": True, "calibration": CALIBRATION, "calibration_samples": 0}, Param("calibration_samples")),
        ({"int8": True, "calibration": CALIBRATION, "int8_min_agreement": 1.5}, Param("int8_min_agreement")),
        ({"int8": True, "calibration": CALIBRATION, "int8_min_sqnr": float("nan")}, Param("int8_min_sqnr")),
        ({"int8": True, "calibration": CALIBRATION, "int8_max_float_layers": -1}, Param("int8_max_float_layers")),
    ],
)
def test_a_bad_value_is_a_usage_error_naming_its_field(fields, param):
    with pytest.raises(bnfold.UsageError) as raised:
        ExportOptions(**fields)
    assert raised.value.params()[0] == param


@pytest.mark.parametrize(
    "fields",
    [
        {"keep_io_types": True, "fp16": True},
        {"rtol": 0.0, "atol": 0.0},
        {"reference": "float64"},
        {"int8": True, "calibration": CALIBRATION, "int8_min_agreement": 1.0, "int8_max_float_layers": 0},
    ],
)
def test_the_edge_values_are_accepted(fields):
    ExportOptions(**fields)


class Stop(Exception):
    pass


def test_export_takes_options_or_their_fields(tmp_path, monkeypatch):
    seen = []

    def fold_and_write(module, example, out, cleanup, options, progress):
        seen.append(options)
        raise Stop

    monkeypatch.setattr("bnfold.exporting._fold_and_write", fold_and_write)
    base, model = ExportOptions(opset=18, verify=False), nn.Conv2d(3, 4, 1)
    for args, fields in (((base,), {}), ((base,), {"fp16": True}), ((), {"fp16": True})):
        with pytest.raises(Stop):
            bnfold.export(model, (torch.zeros(1, 3, 4, 4),), tmp_path / "m.onnx", *args, **fields)
    assert seen == [base, dataclasses.replace(base, fp16=True), ExportOptions(fp16=True)]
    with pytest.raises(TypeError):
        bnfold.export(model, (torch.zeros(1, 3, 4, 4),), tmp_path / "m.onnx", no_such_option=1)
