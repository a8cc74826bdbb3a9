"""Batch-norm folding: capture the model once as a ``torch.export`` program, rewrite it with the
fold rules, report every batch-norm."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.export import ExportedProgram

from ..modes import module_types
from ..report import FoldReport
from .capture import capture
from .driver import fold_program


@dataclass
class FoldResult:
    """A folded program and the report of what happened to every batch-norm."""

    program: ExportedProgram
    report: FoldReport

    @property
    def module(self) -> fx.GraphModule:
        """The folded program as a callable module (computing the same function as the
        original module in eval mode)."""
        return self.program.module()


def fold(module: nn.Module, example_inputs: Sequence[torch.Tensor], *, dynamic_batch: bool = True) -> FoldResult:
    """Fold the batch-norms of ``module`` (evaluated in eval mode) into neighbouring layers.

    ``module`` itself is left untouched (it is not even run); the result is a new program
    computing the same function as ``module.eval()``. ``example_inputs`` give the input shapes
    and dtypes; with ``dynamic_batch`` the batch axis stays free.
    """
    program = capture(module, example_inputs, dynamic_batch=dynamic_batch)
    report = fold_program(program, module_types(module))
    report.dynamic_batch = dynamic_batch
    return FoldResult(program, report)


__all__ = ["FoldResult", "fold"]
