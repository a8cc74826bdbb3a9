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
from .capture import capture, capture_sized
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
    dynamic_size: bool = False,
    rules: Iterable[str] | None = None,
    skip_rules: Iterable[str] | None = None,
    progress: Progress | None = None,
) -> FoldResult:
    """Fold the batch-norms of ``module`` (evaluated in eval mode) into neighbouring layers.

    ``module`` itself is left untouched (it is not even run); the result is a new program
    computing the same function as ``module.eval()``, proven in float64 on ``example_inputs``
    and seeded probes (:mod:`bnfold.folding.proof`): a rewrite the proof finds wrong is undone and
    its batch-norm kept with the reason. ``example_inputs`` give the input shapes and dtypes;
    with ``dynamic_batch`` the batch axis stays free; with ``dynamic_size`` the height and width
    of every image-like input (``NxCxHxW``) too, as far as the model allows: the report states the
    sizes it takes (:attr:`FoldReport.image_sizes`), the proof runs at a second size, and a model
    whose code fixes a size is a :class:`FoldError` naming the op and the line. ``rules`` (names; all by default) and
    ``skip_rules`` choose the fold rules applied (``bnfold.folding.rules.all_rules()`` lists them),
    e.g. to apply one rule alone or to switch one off while hunting a problem. ``progress``
    reports the two steps: the capture, and the fold with its proof.
    """
    chosen = select(rules, skip_rules)
    progress = progress or Progress()
    progress.start("Capturing the model (torch.export)")
    if dynamic_size:
        program, sizes = capture_sized(module, example_inputs, dynamic_batch=dynamic_batch)
    else:
        program, sizes = capture(module, example_inputs, dynamic_batch=dynamic_batch), None
    progress.finish()
    progress.start("Folding batch-norms, proven in float64")
    types = module_types(module)
    other = [s.verification_sizes()[1] if s is not None else None for s in sizes] if sizes else None
    prover = Prover(program, example_inputs, dynamic_batch, other)
    result, check = proven_fold(program, lambda copy, skip: fold_program(copy, types, skip, chosen), prover)
    progress.finish()
    report = result.report
    report.dynamic_batch = dynamic_batch
    report.image_sizes = sizes
    report.proof = prover.report(check, result.undone)
    return FoldResult(result.program, report)


__all__ = ["FoldResult", "fold"]
