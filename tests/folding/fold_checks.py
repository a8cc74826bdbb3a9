"""Checks shared by the fold tests.

Three layers, strictest first:

1. ``assert_fold_exact``: the model in float64 (a copy) is folded, its weights staying float64,
   and the folded graph must equal it element-wise, within ``EXACT_RTOL`` of each output
   channel's own magnitude, so one mis-scaled channel or a slightly wrong eps shows.
2. ``assert_fold_float32``: the model as given, folded in its own dtype, against eval mode (normwise).
3. ``assert_onnx_matches``: ONNX export + ONNX Runtime verification, once per fold rule.

Batch-norms get realistic statistics from ``with_statistics``, each with an eps that differs from
its neighbours', so a rewrite that reads another batch-norm's eps is caught. ``assert_wrong`` shows
that a rewrite a guard refuses would have changed the output. Every tolerance here is the tests'
own constant, never the product's.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from helpers import graph_batchnorm_ops, onnx_batchnorms, random_input
from torch import Tensor, nn

from bnfold import export
from bnfold.folding import FoldResult, fold
from bnfold.folding import math as fold_math

F64 = torch.float64
# Float64 end to end: anything above re-association noise is a wrong rewrite.
EXACT_RTOL = 1e-10
# Keeps an all-zero channel from dividing by zero; far below any real output.
TINY = 1e-30
# The float32 fold against eval mode, normwise: max|got - ref| <= ATOL + RTOL * max|ref|.
FLOAT32_RTOL, FLOAT32_ATOL = 1e-4, 1e-5
# ONNX Runtime (float32) against eval mode, normwise.
ONNX_RTOL, ONNX_ATOL = 1e-4, 1e-5
# A refused rewrite applied by hand must change the output by more than this.
WRONG_BY = 1e-3
# The eps of the 1st, 2nd, 3rd... batch-norm of a model: neighbours differ.
EPS_CYCLE = (1e-3, 1e-5)

Inputs = Tensor | Sequence[Tensor]

# The fold rules these checks apply (by name; None: all). tests/folding/rules/conftest.py sets it
# to the rules of the module under test, so each rule's tests apply that rule alone.
RULES: tuple[str, ...] | None = None


def batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def with_statistics(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch-norm realistic statistics (mean in [-2, 2], variance log-uniform in
    [1e-3, 4], gamma in [-0.5, 1.5], beta in [-1, 1]) and an eps from ``EPS_CYCLE``; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    uniform = lambda n, low, high: torch.rand(n, generator=gen, dtype=F64) * (high - low) + low
    with torch.no_grad():
        for index, bn in enumerate(batchnorms(module)):
            n = bn.num_features
            bn.eps = EPS_CYCLE[index % len(EPS_CYCLE)]
            if bn.track_running_stats:
                bn.running_mean.copy_(uniform(n, -2, 2))
                bn.running_var.copy_(10 ** uniform(n, -3, 0.6))
            if bn.affine:
                bn.weight.copy_(uniform(n, -0.5, 1.5))
                bn.bias.copy_(uniform(n, -1, 1))
    return module.eval()


def zero_shift(bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Make the batch-norm's shift ``t = beta - s * mean`` exactly zero."""
    bn.running_mean.zero_()
    bn.bias.data.zero_()


def bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """The float64 ``(s, t)`` of an eval-mode batch-norm module (for rewrites applied by hand)."""
    return fold_math.bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def as_inputs(inputs: Inputs) -> list[Tensor]:
    return [inputs] if isinstance(inputs, Tensor) else list(inputs)


def float64_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double().eval()


def as_float64(model: nn.Module) -> nn.Module:
    """``model`` itself when it is float64 already (folding leaves it untouched; some models, e.g.
    pruned ones, cannot be deep-copied), else a float64 copy."""
    tensors = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    return model.eval() if all(t.dtype == F64 for t in tensors) else float64_copy(model)


def run(module: nn.Module, inputs: Inputs) -> list[Tensor]:
    """The module's output tensors, flattened, under ``no_grad``."""
    with torch.no_grad():
        out = module(*as_inputs(inputs))
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, Tensor)]


def other_batch(inputs: Sequence[Tensor], batch: int = 5) -> list[Tensor]:
    """Fresh inputs of the same shapes and dtypes at another batch size."""
    return [random_input(batch, *x.shape[1:], seed=2 + i).to(x.dtype) for i, x in enumerate(inputs)]


def assert_channelwise_equal(ref: Tensor, got: Tensor, channel_dim: int = 1) -> None:
    """max|got - ref| over each output channel <= EXACT_RTOL * (max|ref| of that channel + TINY)."""
    assert got.shape == ref.shape and got.dtype == ref.dtype == F64, (got.shape, got.dtype, ref.shape, ref.dtype)
    if ref.dim() < 2:
        ref, got, channel_dim = ref.reshape(1, -1), got.reshape(1, -1), 0
    per_channel = lambda t: t.movedim(channel_dim, 0).reshape(t.shape[channel_dim], -1)
    err = per_channel((got - ref).abs()).amax(dim=1)
    bound = EXACT_RTOL * (per_channel(ref.abs()).amax(dim=1) + TINY)
    bad = (err > bound).nonzero().flatten().tolist()
    assert not bad, f"channels {bad} differ: error {err[bad].tolist()} > bound {bound[bad].tolist()}"


def assert_normwise_close(ref: Tensor, got: Tensor, rtol: float, atol: float) -> None:
    assert got.shape == ref.shape
    err = float((got.double() - ref.double()).abs().max())
    bound = atol + rtol * float(ref.double().abs().max())
    assert err <= bound, f"max abs error {err:.3g} > {bound:.3g}"


def graph_ops(result: FoldResult, name: str) -> int:
    """Ops of the folded graph whose target's name contains ``name`` (e.g. "conv", "add")."""
    return sum(n.op == "call_function" and name in str(n.target) for n in result.module.graph.nodes)


def check_report(model: nn.Module, result: FoldResult, statuses: Sequence[str] | None) -> None:
    """Statuses as expected, one entry per batch-norm module with its channel count, as many
    batch-norm ops left in the graph as the report keeps, and no rewrite the float64 proof had
    to undo (a rule that folds wrongly fails here, not only where the proof's net is visible)."""
    undone = [e for e in result.report.entries if e.category == "float64 proof failed"]
    assert not undone, f"the float64 proof undid wrong rewrites: {undone}"
    if statuses is not None:
        assert [e.status for e in result.report.entries] == list(statuses), result.report.entries
    sizes = sorted(bn.num_features for bn in batchnorms(model))
    assert not sizes or sorted(e.channels for e in result.report.entries if e.op == "batch_norm") == sizes
    assert graph_batchnorm_ops(result) == result.report.kept_batchnorm_ops


def assert_fold_exact(
    model: nn.Module,
    inputs: Inputs,
    statuses: Sequence[str] | None = None,
    *,
    channel_dim: int = 1,
    dynamic_batch: bool = True,
) -> FoldResult:
    """Fold a float64 copy of ``model`` and check the folded graph equals the copy in eval mode,
    channel by channel within ``EXACT_RTOL``, on ``inputs`` (and at another batch size when the
    batch is dynamic); check the report (``statuses`` in batch-norm order). Returns the fold."""
    model64 = as_float64(model)
    inputs64 = [x.double() for x in as_inputs(inputs)]
    result = fold(model64, inputs64, dynamic_batch=dynamic_batch, rules=RULES)
    check_report(model64, result, statuses)
    stored = [*result.module.parameters(), *result.module.buffers()]
    assert all(t.dtype == F64 for t in stored if t.is_floating_point()), "folded weights must stay float64"
    for batch in [inputs64, other_batch(inputs64)] if dynamic_batch else [inputs64]:
        ref, got = run(model64, batch), run(result.module, batch)
        assert len(ref) == len(got)
        for r, g in zip(ref, got):
            assert_channelwise_equal(r, g, channel_dim)
    return result


def assert_fold_float32(model: nn.Module, inputs: Inputs, statuses: Sequence[str] | None = None) -> FoldResult:
    """Fold ``model`` in its own dtype; the folded graph matches eval mode normwise (looser), in
    the same dtype output by output (a fold never changes an output's dtype)."""
    inputs = as_inputs(inputs)
    result = fold(model, inputs, rules=RULES)
    check_report(model, result, statuses)
    for batch in (inputs, other_batch(inputs)):
        for r, g in zip(run(model.eval(), batch), run(result.module, batch), strict=True):
            assert g.dtype == r.dtype, f"the fold changed an output's dtype from {r.dtype} to {g.dtype}"
            assert_normwise_close(r, g, FLOAT32_RTOL, FLOAT32_ATOL)
    return result


def fold_checked(model: nn.Module, inputs: Inputs, statuses: Sequence[str] | None = None, **exact) -> FoldResult:
    """Both fold layers: float64 exact, then float32. Returns the float64 fold."""
    result = assert_fold_exact(model, inputs, statuses, **exact)
    assert_fold_float32(model, inputs, statuses)
    return result


def assert_onnx_matches(model: nn.Module, inputs: Inputs, path: Path) -> None:
    """Export and verify in ONNX Runtime (float32, the tests' tolerances); the ONNX graph keeps
    exactly the batch-norms the report keeps."""
    result = export(model, as_inputs(inputs), path, rtol=ONNX_RTOL, atol=ONNX_ATOL, rules=RULES)
    assert result.verify_report.passed
    assert onnx_batchnorms(path) == result.fold_report.kept_batchnorm_ops == result.onnx_batchnorm_count


def kept_entry(result: FoldResult):
    (entry,) = [e for e in result.report.entries if e.status == "kept"]
    return entry


def kept_reason(result: FoldResult) -> str:
    return kept_entry(result).reason


def assert_wrong(reference: Tensor, naive: Tensor) -> None:
    """A rewrite applied by hand (``naive``) would have changed the output by more than ``WRONG_BY``."""
    error = float((naive.detach().double() - reference.detach().double()).abs().max())
    assert error > WRONG_BY, f"the refused rewrite is only off by {error:.3g}: the guard would not be needed"
