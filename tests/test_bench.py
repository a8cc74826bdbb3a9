"""bnfold.bench: every variant timed at every batch size; the floor really is BN-free."""

from __future__ import annotations

import copy
import json

import pytest
from helpers import assert_close, random_input, randomize_batchnorms
from torch import nn

from bnfold.bench import FILE_FP32, FILE_INT8, ORT_BNFOLD, ORT_INT8, VARIANTS, bench, bn_free_floor
from bnfold.errors import Param, UsageError
from bnfold.folding.sites import batchnorm_nodes
from bnfold.user_module import run_eval


def model() -> nn.Module:
    return randomize_batchnorms(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1))
    )


def test_floor_is_the_model_with_batchnorms_as_identity():
    m = model()
    floor = bn_free_floor(m, (random_input(1, 3, 8, 8),))
    assert batchnorm_nodes(floor.graph) == []
    identity = copy.deepcopy(m)
    identity[1], identity[3] = nn.Identity(), nn.Identity()
    x = random_input(4, 3, 8, 8)
    assert_close(run_eval(identity, [x])[0], run_eval(floor, [x])[0])


def test_bench_times_every_variant_at_every_batch_size():
    report = bench(model(), (random_input(1, 3, 8, 8),), name="tiny", batch_sizes=(1, 3), repeats=2, warmup=1)
    assert set(report.median_ms) == set(VARIANTS)
    assert all(set(v) == {1, 3} and all(t > 0 for t in v.values()) for v in report.median_ms.values())
    ratios = report.ratios()
    assert (
        ratios["eager folded / eager original"][1]
        == report.median_ms["eager folded"][1] / report.median_ms["eager original"][1]
    )
    assert set(report.session_creation_ms) == {"plain export", "bnfold", "bnfold, opts disabled"}
    json.dumps(report.to_dict())
    assert "ratios:" in str(report)


def test_bench_int8_times_the_quantized_model_beside_float32_and_compares_sizes():
    calibration = random_input(40, 3, 8, 8).numpy()
    report = bench(
        model(), (random_input(1, 3, 8, 8),), batch_sizes=(2,), repeats=1, warmup=1, int8=True, calibration=calibration
    )
    assert set(report.median_ms) == {*VARIANTS, ORT_INT8}
    ratio = report.ratios()["ORT bnfold INT8 / ORT bnfold default"][2]
    assert ratio == report.median_ms[ORT_INT8][2] / report.median_ms[ORT_BNFOLD][2]
    assert set(report.file_bytes) == {FILE_FP32, FILE_INT8} and "INT8 / float32" in str(report)


def test_bench_int8_needs_calibration_data():
    with pytest.raises(UsageError) as raised:
        bench(model(), (random_input(1, 3, 8, 8),), int8=True)
    assert raised.value.params() == (Param("int8", True), Param("calibration"))
