"""BN -> BN: two batch-norms compose into one (the second keeps its running_var and eps), exactly
(float64, per channel), whether the result then folds into a layer or stays."""

from __future__ import annotations

import pytest
from fold_checks import assert_fold_exact, assert_onnx_matches, fold_checked, with_statistics
from helpers import random_input
from torch import nn

RULES = ("bn_bn",)  # applied alone: see conftest.py


@pytest.mark.rules("bn_bn", "bn_conv")  # the composed batch-norm then folds into the conv
def test_bn_bn_conv_chain_after_an_activation():
    model = with_statistics(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)))
    result = fold_checked(model, random_input(2, 3, 6, 6), ["folded", "folded"])
    assert result.report.entries[0].into == "2" and "composed" in result.report.entries[0].pattern
    assert result.report.entries[1].into == "3"


def test_bn_bn_between_activations_composes_into_one_kept_op():
    model = with_statistics(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.BatchNorm2d(3), nn.ReLU()))
    fold_checked(model, random_input(2, 3, 6, 6), ["folded", "kept"])


def test_three_bns_compose_into_the_last():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4), nn.BatchNorm1d(4), nn.BatchNorm1d(4), nn.ReLU())
    result = fold_checked(with_statistics(model), random_input(3, 4, 5), ["folded", "folded", "kept"])
    assert [e.into for e in result.report.entries[:2]] == ["2", "3"]


def test_bn_composes_into_a_bn_without_affine():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.BatchNorm2d(3, affine=False), nn.ReLU())
    fold_checked(with_statistics(model), random_input(2, 3, 5, 5), ["folded", "kept"])


def test_kept_when_the_following_bn_uses_batch_statistics():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU())
    result = assert_fold_exact(with_statistics(model), random_input(4, 3, 5, 5), ["kept", "kept"])
    assert "the following batch-norm uses batch statistics" in result.report.entries[0].reason
    assert "track_running_stats=False" in result.report.entries[1].reason


def test_onnx_export_of_a_composed_bn(tmp_path):
    model = with_statistics(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.BatchNorm2d(3), nn.ReLU()))
    assert_onnx_matches(model, random_input(2, 3, 6, 6), tmp_path / "model.onnx")
