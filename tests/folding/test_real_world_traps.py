"""Traps found on real third-party architectures: each was a bug or a misleading message once."""

from __future__ import annotations

import pytest
import torch
from fold_checks import (
    assert_fold_exact,
    assert_fold_float32,
    assert_onnx_matches,
    fold_checked,
    kept_reason,
    with_statistics,
)
from helpers import random_input, randomize_batchnorms
from torch import nn
from torch.nn.utils import parametrizations, prune

import bnfold


@pytest.mark.parametrize(
    "reparametrize",
    [
        lambda conv: prune.l1_unstructured(conv, "weight", amount=0.3),
        lambda conv: parametrizations.weight_norm(conv),
        lambda conv: parametrizations.spectral_norm(conv),
    ],
    ids=["pruned", "weight_norm", "spectral_norm"],
)
def test_weights_computed_from_stored_tensors_are_folded(reparametrize):
    for dtype, check in ((torch.float64, assert_fold_exact), (torch.float32, assert_fold_float32)):
        model = with_statistics(nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU()).to(dtype))
        reparametrize(model[0])  # after the dtype: a pruned model cannot be copied to float64
        check(model, random_input(2, 3, 8, 8), ["folded"])


def test_folded_entries_report_their_channel_count():
    model = with_statistics(nn.Sequential(nn.Conv2d(3, 7, 1), nn.BatchNorm2d(7), nn.BatchNorm2d(7)))
    folded = fold_checked(model, random_input(2, 3, 4, 4))
    assert [e.channels for e in folded.report.entries] == [7, 7]


class VarArgs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, *xs):
        return self.bn(self.conv(xs[0] + xs[1]))


def test_forward_with_star_args(tmp_path):
    model = randomize_batchnorms(VarArgs())
    result = bnfold.export(model, (random_input(1, 3, 6, 6), random_input(1, 3, 6, 6, seed=3)), tmp_path / "m.onnx")
    assert result.fold_report.folded_count == 1 and result.verify_report.passed


def test_dataparallel_wrapper_is_unwrapped(tmp_path):
    model = nn.DataParallel(randomize_batchnorms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))))
    assert bnfold.export(model, (random_input(1, 3, 6, 6),), tmp_path / "m.onnx").fold_report.folded_count == 1


def test_eval_mode_dropout_does_not_block_folding():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 3))
    fold_checked(with_statistics(model), random_input(4, 6), ["folded"])


def test_bn_before_a_cropping_conv_transpose_gets_the_right_reason():
    model = with_statistics(nn.Sequential(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1)))
    assert "non-zero shift" in kept_reason(assert_fold_exact(model, random_input(2, 4, 5, 5), ["kept"]))


def test_half_precision_model_uses_float16_tolerances(tmp_path):
    model = randomize_batchnorms(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    ).half()
    result = bnfold.export(model, (random_input(1, 3, 10, 10).half(),), tmp_path / "m.onnx")
    assert result.verify_report.passed and result.verify_report.rtol == 1e-2


def test_float64_model_error_names_the_target_and_the_dtype(tmp_path):
    model = randomize_batchnorms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).double()
    with pytest.raises(bnfold.BnfoldError) as info:
        bnfold.export(model, (random_input(1, 3, 6, 6).double(),), tmp_path / "m.onnx")
    assert ".tmp" not in str(info.value) and "torch.float64" in str(info.value) and "`verify=False`" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_exported_program_saved_with_a_fixed_batch_says_static_batch(tmp_path):
    model = randomize_batchnorms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    torch.export.save(torch.export.export(model, (random_input(1, 3, 6, 6),)), str(tmp_path / "m.pt2"))
    loaded = bnfold.load_model(tmp_path / "m.pt2")
    with pytest.raises(bnfold.FoldError, match="`dynamic_batch=False`"):
        bnfold.fold(loaded.module, loaded.example_inputs())
    assert bnfold.fold(loaded.module, loaded.example_inputs(), dynamic_batch=False).report.folded_count == 1


class DataDependentBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:  # data-dependent control flow: no capture path can trace it
            return y * 2
        return y


def test_untraceable_model_names_the_failing_construct(capfd):
    with pytest.raises(
        bnfold.FoldError, match=r"non-strict and strict.*test_real_world_traps.py:\d+: if y.sum\(\) > 0:"
    ):
        bnfold.fold(DataDependentBranch().eval(), (random_input(1, 3, 6, 6),))
    out, err = capfd.readouterr()
    assert "def forward" not in out + err  # torch's graph dump stays hidden


class ChannelShuffle(nn.Module):
    """ShuffleNetV2: view -> transpose -> contiguous -> view needs the contiguous copy kept."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        b, c, h, w = y.shape
        return y.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)


def test_channel_shuffle_keeps_its_contiguous_copy(tmp_path):
    model = with_statistics(ChannelShuffle())
    fold_checked(model, random_input(2, 4, 5, 5), ["folded"])
    assert_onnx_matches(model, random_input(2, 4, 5, 5), tmp_path / "model.onnx")
