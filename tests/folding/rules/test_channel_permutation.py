"""A per-channel affine map commutes with a channel permutation (bnfold.folding.rules.channel_permutation):
ShuffleNet's channel shuffle (view → transpose → reshape) or an index_select by a stored
permutation, between a layer and a batch-norm on either side. Each rule is applied alone; the
permutations are not self-inverse (3 groups of 4), so permuting ``s, t`` the wrong way round
cannot pass; ops that are no permutation are left to the other rules."""

from __future__ import annotations

import pytest
import torch
from fold_checks import assert_fold_exact, kept_reason, with_statistics
from helpers import random_input
from torch import nn

from bnfold.folding import fold

RULES = ("permutation_bn", "bn_permutation")  # applied alone: see conftest.py

GROUPS, CHANNELS = 3, 12


def channel_shuffle(x: torch.Tensor, groups: int = GROUPS) -> torch.Tensor:
    """ShuffleNet's: split the channels into groups, transpose, flatten back."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class Shuffled(nn.Module):
    """conv → ``move`` → BN (``bn_first=False``) or BN → ``move`` → conv."""

    def __init__(self, move, bn_first: bool, padding: int = 0) -> None:
        super().__init__()
        self.move, self.bn_first = move, bn_first
        self.conv = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=padding)
        self.bn = nn.BatchNorm2d(CHANNELS)
        self.register_buffer("order", torch.randperm(CHANNELS, generator=torch.Generator().manual_seed(5)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn_first:
            return self.conv(self.move(self, self.bn(x)))
        return self.bn(self.move(self, self.conv(x)))


SHUFFLE = lambda m, x: channel_shuffle(x)
SELECT = lambda m, x: x.index_select(1, m.order)


@pytest.mark.parametrize("move", [SHUFFLE, SELECT], ids=["channel shuffle", "index_select"])
def test_a_batchnorm_after_a_channel_permutation_folds_into_the_conv_with_its_map_permuted(move):
    model = with_statistics(Shuffled(move, bn_first=False))
    result = assert_fold_exact(model, random_input(2, CHANNELS, 6, 7), ["folded"])
    assert "channels permuted" in result.report.entries[0].pattern
    assert_fold_exact(model, random_input(2, CHANNELS, 6, 7), ["folded"])  # and with this rule alone:
    alone = fold(model.double(), (random_input(2, CHANNELS, 6, 7).double(),), rules=["permutation_bn"])
    assert alone.report.entries[0].status == "folded"


@pytest.mark.parametrize("move", [SHUFFLE, SELECT], ids=["channel shuffle", "index_select"])
def test_a_batchnorm_before_a_channel_permutation_folds_into_the_following_conv(move):
    model = with_statistics(Shuffled(move, bn_first=True))
    assert_fold_exact(model, random_input(2, CHANNELS, 6, 7), ["folded"])
    alone = fold(model.double(), (random_input(2, CHANNELS, 6, 7).double(),), rules=["bn_permutation"])
    assert alone.report.entries[0].status == "folded"


def test_kept_before_a_permutation_and_a_zero_padded_conv_when_the_shift_is_not_zero():
    model = with_statistics(Shuffled(SHUFFLE, bn_first=True, padding=1))
    assert "zero-pads its input" in kept_reason(assert_fold_exact(model, random_input(2, CHANNELS, 6, 7), ["kept"]))


def test_ops_that_mix_channels_are_no_permutation():
    """A view that moves spatial values into the channel axis: each output channel holds
    values of several input channels, so neither rule applies."""
    mix = lambda m, x: x.reshape(x.shape[0], CHANNELS, -1).transpose(1, 2).reshape(x.shape)
    model = with_statistics(Shuffled(mix, bn_first=False))
    x = random_input(2, CHANNELS, 4, 3)  # 4·3 = 12 spatial values: the shape is kept
    result = fold(model.double(), (x.double(),), rules=["permutation_bn"])
    assert result.report.entries[0].status == "kept"
    assert_fold_exact(model, x, ["kept"])


def test_the_permutation_rules_are_off_when_skipped():
    model = with_statistics(Shuffled(SHUFFLE, bn_first=False))
    result = fold(model.double(), (random_input(2, CHANNELS, 6, 7).double(),), skip_rules=["permutation_bn"])
    assert result.report.entries[0].status == "kept"


def test_an_index_select_that_repeats_a_channel_is_no_permutation():
    repeat = lambda m, x: x.index_select(1, m.order)
    model = with_statistics(Shuffled(repeat, bn_first=False))
    with torch.no_grad():
        model.order.copy_(torch.tensor([0, 0, *range(1, CHANNELS - 1)]))
    assert_fold_exact(model, random_input(2, CHANNELS, 6, 7), ["kept"])


class TokensThenLinear(nn.Module):
    """BatchNorm1d on [N, C, T] → transpose to [N, T, C] → Linear over C: the channels move to the
    last axis, where the Linear reads them."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(4), nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.bn(torch.relu(x)).transpose(1, 2))


def test_a_batchnorm_whose_channels_a_transpose_hands_to_a_linear_folds_into_it():
    result = assert_fold_exact(with_statistics(TokensThenLinear()), random_input(2, 4, 6), ["folded"])
    assert result.report.entries[0].pattern == "BatchNorm1d → transpose → Linear, input side, channels permuted"
