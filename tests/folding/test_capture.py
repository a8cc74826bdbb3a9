"""Capture traces the model once and never runs it: a forward that caches state (YOLO-style
anchor grids and input shapes) keeps a dynamic batch and leaves the user's module as it was; a
model whose own code fixes the batch is refused naming that line."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import bnfold


class CachingHead(nn.Module):
    """Caches a grid and the input shape in forward, as detection heads do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.shape: torch.Size | None = None
        self.grid = torch.zeros(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.shape != y.shape:  # the batch is part of the cached shape
            self.grid = torch.arange(y.shape[-1], dtype=y.dtype)
            self.shape = y.shape
        return y + self.grid


def _state(model: CachingHead) -> tuple:
    return model.shape, model.grid, {k: v.clone() for k, v in model.state_dict().items()}


def test_a_forward_that_caches_state_exports_with_a_dynamic_batch_and_the_model_is_unchanged(tmp_path):
    model = CachingHead().eval()
    shape, grid, weights = _state(model)
    result = bnfold.export(model, (torch.randn(1, 3, 8, 8),), tmp_path / "m.onnx")  # verification runs it too
    assert result.fold_report.folded_count == 1 and result.verify_report.passed
    assert model.shape is shape is None and model.grid is grid
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_the_line_of_the_models_code_that_fixes_the_batch_is_named():
    model = CachingHead().eval()
    model(torch.randn(2, 3, 8, 8))  # now the cached shape holds batch 2, the capture's example batch
    lines, first = inspect.getsourcelines(CachingHead.forward)
    line = first + next(i for i, text in enumerate(lines) if "self.shape != y.shape" in text)
    with pytest.raises(bnfold.FoldError, match=rf"fixes the batch dimension at {__file__}:{line} "):
        bnfold.fold(model, (torch.randn(1, 3, 8, 8),))
    assert bnfold.fold(model, (torch.randn(2, 3, 8, 8),), dynamic_batch=False).report.folded_count == 1


def test_capture_failure_runs_a_copy_so_a_rejected_shape_is_named_and_the_model_untouched():
    model = CachingHead().eval()
    with pytest.raises(bnfold.FoldError, match=r"the model fails on input shape\(s\) 1x5x8x8"):
        bnfold.fold(model, (torch.randn(1, 5, 8, 8),))
    assert model.shape is None
