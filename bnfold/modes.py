"""Running a PyTorch module the way verification and folding need: eval mode, no grad."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the duration, restoring each submodule's mode after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def run_eval(module: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Outputs of ``module(*inputs)`` in eval mode under ``no_grad``, flattened in pytree order."""
    with eval_mode(module), torch.no_grad():
        out = module(*inputs)
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
