"""Traps a fresh-eyes review found in the fold rules, each now refused (or reported) correctly:
in-place writes to a tensor a fold would make a layer read, buffers the forward changes,
reductions over the batch axis, unbatched convs, dtype promotion by an affine constant, negative
permute dims, and the report of a conv that is both merged and called elsewhere. Exact in float64."""

from __future__ import annotations

import copy

import torch
from fold_checks import assert_fold_exact, with_statistics
from helpers import random_input
from torch import nn

from bnfold.folding import fold

C = 4


class SourceChangedInPlace(nn.Module):
    """``y = bn(x); x.relu_(); conv(y)``: folding into the conv would make it read the changed x."""

    def __init__(self, first: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.conv = nn.Conv2d(C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 1.0
        y = self.first(x)
        x.relu_()
        return self.conv(y) + x


class LayerScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(C, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def test_an_input_changed_in_place_after_the_batchnorm_is_not_read_instead():
    for first in (nn.BatchNorm2d(C), LayerScale()):
        result = assert_fold_exact(with_statistics(SourceChangedInPlace(first)), random_input(2, C, 5, 5))
        [entry] = result.report.entries
        assert entry.status == "kept" and "changed in place" in entry.reason


class ChangedBuffer(nn.Module):
    """``forward`` multiplies by a buffer, then changes it: the buffer is state, not a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3)
        self.register_buffer("g", torch.rand(C, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x) * self.g
        self.g.add_(1.0)
        return y * self.g


def test_a_buffer_the_forward_changes_is_never_folded():
    model = ChangedBuffer().double().eval()
    x = random_input(2, C, 6, 6).double()
    result = fold(copy.deepcopy(model), [x])
    assert result.report.entries == []
    reference = copy.deepcopy(model)
    for _ in range(2):  # the second call sees the changed buffer in both
        assert torch.allclose(result.module(x), reference(x), rtol=1e-12, atol=0)


class MeanOverBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(C)
        self.fc = nn.Linear(C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x).mean((0, 3)))  # [H, C]: the rows are no longer batch items


def test_a_mean_over_the_batch_axis_does_not_carry_the_channels():
    result = assert_fold_exact(
        with_statistics(MeanOverBatch()), random_input(2, C, C, 5), ["kept"], dynamic_batch=False
    )
    assert "batch or channel axis" in result.report.entries[0].reason


class Unbatched(nn.Module):
    """A conv1d on ``[C, L]``: its channels are dim 0, a BatchNorm1d on the result normalises L."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(C, C, 1)
        self.bn = nn.BatchNorm1d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x[0]))


def test_an_unbatched_conv_is_not_folded_into():
    assert_fold_exact(with_statistics(Unbatched()), random_input(1, C, C), ["kept"], dynamic_batch=False)


def test_an_affine_constant_of_a_wider_dtype_is_kept_and_reported_with_its_reason():
    class Promotes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(C, C, 3)
            self.register_buffer("g", torch.rand(C, 1, 1, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) * self.g

    model = Promotes().eval()
    x = random_input(2, C, 6, 6)
    result = fold(model, [x])
    (entry,) = result.report.entries
    assert entry.status == "kept" and "would change the output dtype" in entry.reason
    assert result.module(x).dtype == model(x).dtype == torch.float64


def test_a_permute_with_negative_dims_between_linear_and_batchnorm():
    class Permuted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, C)
            self.bn = nn.BatchNorm1d(C)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.fc(x).permute(0, -1, 1))

    assert_fold_exact(with_statistics(Permuted()), random_input(2, 5, 6), ["folded"])


class MergedAndCalledElsewhere(nn.Module):
    """Conv ``b`` is a branch of a merged block and, at another call, absorbs ``bn2``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(C, C, 3, padding=1)
        self.b = nn.Conv2d(C, C, 1)
        self.bn2 = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x) + self.b(x) + x, self.bn2(self.b(z))


def test_the_report_names_the_call_a_batchnorm_went_into_not_a_merged_namesake():
    inputs = [random_input(2, C, 5, 5), random_input(2, C, 5, 5, seed=2)]
    result = assert_fold_exact(with_statistics(MergedAndCalledElsewhere()), inputs, ["folded"])
    assert result.report.entries[0].into == "b" and "merged" not in result.report.entries[0].pattern


class InPlaceResidualWithAView(nn.Module):
    """``v = y[:, :2]; y += conv(y)``: the view sees the in-place sum, which a merge would lose."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Conv2d(C, C, 1)
        self.conv = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pre(x).relu()
        v = y[:, :2]
        y += self.conv(y)
        return v * 1.0


def test_an_in_place_sum_into_a_tensor_others_read_is_not_merged():
    assert_fold_exact(InPlaceResidualWithAView(), random_input(2, C, 6, 6), [])
