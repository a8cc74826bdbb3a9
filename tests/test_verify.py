"""The verifier must catch a wrong fold, with exit code 1 and no file under the target name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bnfold.cli.main import main
from click.testing import CliRunner
from helpers import random_input, randomize_batchnorms
from torch import nn

import bnfold
from bnfold.fold import math as fold_math


def small_model() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, eps=0.1), nn.Flatten(), nn.Linear(8 * 16, 5))
    return randomize_batchnorms(model)


def drop_eps(mean, var, weight, bias, eps):
    return original_scale_shift(mean, var, weight, bias, 0.0)


def misscale_channel(mean, var, weight, bias, eps):
    s, t = original_scale_shift(mean, var, weight, bias, eps)
    s = s.clone()
    s[s.abs().argmax()] *= 1.01
    return s, t


original_scale_shift = fold_math.bn_scale_shift


@pytest.mark.parametrize("broken", [drop_eps, misscale_channel], ids=["eps-dropped", "channel-misscaled"])
def test_wrong_fold_fails_verification_and_writes_nothing(broken, tmp_path, monkeypatch):
    monkeypatch.setattr(fold_math, "bn_scale_shift", broken)
    target = tmp_path / "model.onnx"
    with pytest.raises(bnfold.VerificationError) as info:
        bnfold.export(small_model(), (random_input(1, 3, 6, 6),), target)
    assert not info.value.report.passed
    assert info.value.report.outputs[0].max_abs_error > info.value.report.outputs[0].tolerance
    assert list(tmp_path.iterdir()) == []


def test_wrong_fold_exits_1_from_the_cli(tmp_path, monkeypatch):
    model_file = tmp_path / "model.pt"
    torch.jit.save(torch.jit.trace(small_model(), random_input(2, 3, 6, 6)), str(model_file))
    monkeypatch.setattr(fold_math, "bn_scale_shift", misscale_channel)
    result = CliRunner().invoke(main, ["export", str(model_file), "--input-shape", "1x3x6x6"])
    assert result.exit_code == 1
    assert "verification failed" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_correct_fold_passes_with_both_batch_sizes(tmp_path):
    result = bnfold.export(small_model(), (random_input(1, 3, 6, 6),), tmp_path / "m.onnx")
    report = result.verify_report
    assert report.passed and report.batch_sizes == [1, 8]
    assert report.outputs[0].max_rel_error < report.rtol


def test_top1_disagreement_with_clear_margin_fails(tmp_path):
    """A top-1 swap on a row whose reference margin exceeds the max error fails, even when the
    numbers are within tolerance; a swap on a row with a smaller margin is allowed."""
    from bnfold.verify import _Accumulator

    ref = np.array([[1.0, 0.0, -1.0], [0.0, 0.2, 0.0]])
    flipped_clear = np.array([[0.45, 0.55, -1.0], [0.0, 0.2, 0.0]])  # error 0.55 < margin 1.0
    acc = _Accumulator("logits")
    acc.add(ref, flipped_clear)
    check = acc.check(rtol=10.0, atol=10.0)
    assert check.max_abs_error <= check.tolerance
    assert check.argmax_decidable_rows == 1 and check.argmax_mismatches == 1 and not check.passed

    flipped_close = np.array([[1.0, 0.0, -1.0], [0.25, 0.0, 0.0]])  # error 0.25 > margin 0.2
    acc = _Accumulator("logits")
    acc.add(ref, flipped_close)
    assert acc.check(rtol=10.0, atol=10.0).passed


def test_user_inputs_of_the_wrong_shape_are_a_usage_error(tmp_path):
    path = bnfold.export(small_model(), (random_input(1, 3, 6, 6),), tmp_path / "m.onnx", verify=False).path
    np.save(tmp_path / "bad.npy", np.zeros((4, 3, 7, 7), dtype=np.float32))
    with pytest.raises(bnfold.UsageError, match="shape"):
        bnfold.verify(small_model(), path, tmp_path / "bad.npy")
    np.save(tmp_path / "int.npy", np.zeros((4, 3, 6, 6), dtype=np.int64))
    with pytest.raises(bnfold.UsageError, match="dtype"):
        bnfold.verify(small_model(), path, tmp_path / "int.npy")
