"""Batch-norm folding: capture the model once as a ``torch.export`` program, rewrite a copy of it
with the fold rules, prove the copy computes the same function in float64, report every
batch-norm."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.export import ExportedProgram

from ..progress import Progress
from ..report import FoldReport, ProofReport
from ..user_module import module_types
from .capture import capture
from .driver import fold_program
from .proof import Prover, proven_fold
from .rules import select


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

    @property
    def proof(self) -> ProofReport:
        """The float64 proof that :attr:`module` computes the same function as the original."""
        return self.report.proof


def fold(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    dynamic_batch: bool = True,
    rules: Iterable[str] | None = None,
    skip_rules: Iterable[str] | None = None,
    progress: Progress | None = None,
) -> FoldResult:
    """Fold the batch-norms of ``module`` (evaluated in eval mode) into neighbouring layers.

    ``module`` itself is left untouched (it is not even run); the result is a new program
    computing the same function as ``module.eval()``, proven in float64 on ``example_inputs``
    and seeded probes (:mod:`bnfold.folding.proof`): a rewrite the proof finds wrong is undone and
    its batch-norm kept with the reason. ``example_inputs`` give the input shapes and dtypes;
    with ``dynamic_batch`` the batch axis stays free. ``rules`` (names; all by default) and
    ``skip_rules`` choose the fold rules applied (``bnfold.folding.rules.all_rules()`` lists them),
    e.g. to apply one rule alone or to switch one off while hunting a problem. ``progress``
    reports the two steps: the capture, and the fold with its proof.
    """
    chosen = select(rules, skip_rules)
    progress = progress or Progress()
    progress.start("Capturing the model (torch.export)")
    program = capture(module, example_inputs, dynamic_batch=dynamic_batch)
    progress.finish()
    progress.start("Folding batch-norms, proven in float64")
    types = module_types(module)
    prover = Prover(program, example_inputs, dynamic_batch)
    result, check = proven_fold(program, lambda copy, skip: fold_program(copy, types, skip, chosen), prover)
    progress.finish()
    report = result.report
    report.dynamic_batch = dynamic_batch
    report.proof = prover.report(check, result.undone)
    return FoldResult(result.program, report)


__all__ = ["FoldResult", "fold"]
