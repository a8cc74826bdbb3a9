"""Batch-norm folding: capture the model as a graph, rewrite it, report every batch-norm."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..modes import module_types
from ..report import FoldReport
from .branches import merge_parallel_branches
from .capture import capture
from .graph import fold_graph, remove_unused_attributes


@dataclass
class FoldResult:
    """A folded module and the report of what happened to every batch-norm."""

    module: fx.GraphModule
    report: FoldReport


def fold(module: nn.Module, example_inputs: Sequence[torch.Tensor], *, dynamic_batch: bool = True) -> FoldResult:
    """Fold the batch-norms of ``module`` (evaluated in eval mode) into neighbouring layers.

    ``module`` itself is left untouched; the result is a new ``GraphModule`` computing the same
    function as ``module.eval()``. ``example_inputs`` give the input shapes and dtypes; with
    ``dynamic_batch`` the batch axis stays free.
    """
    graph_module = capture(module, example_inputs, dynamic_batch=dynamic_batch)
    report = fold_graph(graph_module, module_types(module))
    merge_parallel_branches(graph_module, report)
    remove_unused_attributes(graph_module)
    report.dynamic_batch = dynamic_batch
    return FoldResult(graph_module, report)


__all__ = ["FoldResult", "fold"]
