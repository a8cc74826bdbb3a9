"""The float64 proof that a folded program computes the same function as the original.

Every rewrite is exact algebra (``s·(W∗x + b) + t = (s·W)∗x + (s·b + t)`` and the like), so in
float64 the folded and the unfolded program agree up to float64 rounding: about 1e-16 of each
output's scale, times the network's conditioning. A wrong rewrite (a wrong axis, offset, sign or
guard) changes the function and shows many orders of magnitude above :data:`PROOF_RTOL`: it is
caught with certainty, not judged against a tolerance.

Both programs run on their lifted graphs with every floating tensor in float64 (stored tensors,
the inputs, and floating dtype arguments such as ``x.float()``): the original is the program as
captured, before folding; the folded one holds its new tensors exact (float64) until the proof
passes. The inputs are the example inputs and seeded probes of other scales and signs
(:data:`PROBES`), large enough to reach clamps and other data-dependent branches. A model that
cannot run in float64 (an op without a double kernel) is checked in its own dtype instead, against
verification's float32 tolerance, and the report says so.

When the proof fails, the rewrite responsible is found by bisection over the rewrites in the
order they were applied (folding only a prefix of them), undone (its batch-norm kept with the
reason) and the rest proven again, until the proof passes.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from ..defaults import DEFAULT_ATOL, DEFAULT_RTOL
from ..errors import FoldError, first_line
from ..report import ProofReport
from ..user_module import quiet_torch
from .ops import aten, mutated
from .store import F64, lift_dtype, to_float64

# Folded against original in float64, normwise per output: max|y - y_ref| <= PROOF_RTOL * max|y_ref|.
PROOF_RTOL = 1e-10
# Rows of the example inputs the proof uses when the batch is dynamic (all of them otherwise).
EXAMPLE_ROWS = 1


def _mixed_probe(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """Each value, independently, either large with a random sign (``1000·N(0, 1)``: reaches
    clamps such as ReLU6 and saturations) or moderate and negative (``U(-5, -1)``: flips
    sign-dependent branches), with probability 1/2: both regimes in one sample, next to each
    other, at the cost of one sample of a float64 forward pass."""
    large = 1000.0 * torch.randn(shape, generator=gen, dtype=F64)
    negative = -1.0 - 4.0 * torch.rand(shape, generator=gen, dtype=F64)
    return torch.where(torch.rand(shape, generator=gen) < 0.5, large, negative)


# Seeded probes beside the example: name -> values of a given shape.
PROBES: dict[str, Callable[[tuple[int, ...], torch.Generator], Tensor]] = {
    "the probe (1000·N(0, 1) or U(-5, -1))": _mixed_probe,
}
SEED = 0
# Ops whose dtype argument reinterprets bits: never raised to float64.
_BIT_VIEWS = {aten.view.dtype}

Inputs = tuple[Tensor, ...]


def probe_inputs(example_inputs: Sequence[Tensor], dynamic_batch: bool) -> tuple[list[Inputs], int, int]:
    """The input sets the proof runs (one batch with a row of each probe when the batch is
    dynamic, else the example and one full batch per probe), the number of inputs (example +
    probes) and the number of samples in all."""
    gen = torch.Generator().manual_seed(SEED)
    example = tuple(example_inputs)
    if dynamic_batch:
        example = tuple(x[:EXAMPLE_ROWS] for x in example)
    rows = 1 if dynamic_batch else None

    def probe(make: Callable) -> Inputs:
        out = []
        for x in example:
            shape = tuple(x.shape) if rows is None else (rows, *x.shape[1:])
            out.append(make(shape, gen).to(x.dtype) if x.is_floating_point() else x[: shape[0]].clone())
        return tuple(out)

    probes = [probe(make) for make in PROBES.values()]
    inputs = 1 + len(probes)
    if dynamic_batch:
        batch = tuple(torch.cat([x, *(p[i] for p in probes)]) for i, x in enumerate(example))
        return [batch], inputs, int(batch[0].shape[0]) if batch else 0
    return [example, *probes], inputs, sum(int(run[0].shape[0]) for run in [example, *probes] if run)


def resized_probe(example_inputs: Sequence[Tensor], sizes: Sequence[tuple[int, int] | None]) -> Inputs:
    """One sample of the first probe with each image-like input at its size in ``sizes``
    (``None``: the input as in the example): the proof at another image size."""
    gen = torch.Generator().manual_seed(SEED)
    make = next(iter(PROBES.values()))
    return tuple(
        x[:1].clone() if size is None else make((1, *x.shape[1:-2], *size), gen).to(x.dtype)
        for x, size in zip(example_inputs, sizes)
    )


class _Stored:
    """A stored tensor the run computes (or converts) only when an op reads it."""

    def __init__(self, fetch: Callable[[], Tensor]) -> None:
        self.fetch = fetch


def _materialize(value: object) -> object:
    return value.fetch() if isinstance(value, _Stored) else value


class _Run(fx.Interpreter):
    """Runs a lifted graph with each stored tensor materialised for the op that reads it and
    released after, so that a float64 run never holds a float64 copy of the whole model; in
    float64, floating dtype arguments are raised to float64 too."""

    def __init__(self, gm: fx.GraphModule, float64: bool) -> None:
        super().__init__(gm)
        self.float64 = float64

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        args = torch.utils._pytree.tree_map(_materialize, args)
        kwargs = torch.utils._pytree.tree_map(_materialize, kwargs)
        if self.float64 and target not in _BIT_VIEWS:
            args = torch.utils._pytree.tree_map(lift_dtype, args)
            kwargs = torch.utils._pytree.tree_map(lift_dtype, kwargs)
        return target(*args, **kwargs)

    def output(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return torch.utils._pytree.tree_map(_materialize, args[0])


def run_program(
    program: ExportedProgram,
    runs: Sequence[Inputs],
    float64: bool,
    exact: Mapping[str, Callable[[], Tensor]] | None = None,
) -> list[list[Tensor]]:
    """The user outputs of ``program``'s lifted graph on each input set of ``runs``, in float64
    (every floating tensor and dtype argument) or in the program's own dtypes. ``exact`` gives
    the stored tensors held as functions (a fold's new weights, float64). Nothing the program
    holds is changed: tensors the graph writes in place are copied first."""
    exact = exact or {}
    placeholders = [n for n in program.graph_module.graph.nodes if n.op == "placeholder"]
    written = {n.name for n in placeholders if mutated(n)}
    convert = to_float64 if float64 else (lambda v: v)
    state: list[object] = []
    for node, spec in zip(placeholders, program.graph_signature.input_specs):
        if spec.kind == InputKind.USER_INPUT:
            state.append(None)
            continue
        if spec.kind == InputKind.TOKEN:
            state.append(torch.tensor([]))
            continue
        if spec.target in exact:
            fetch = exact[spec.target]
        else:
            table = program.state_dict if spec.target in program.state_dict else program.constants
            fetch = lambda value=table[spec.target]: convert(value)
        state.append(fetch().clone() if node.name in written else _Stored(fetch))
    kinds = [spec.kind for spec in program.graph_signature.output_specs]
    results = []
    for inputs in runs:
        given = iter(inputs)
        args = [convert(next(given)).clone() if value is None else value for value in state]
        with torch.no_grad(), quiet_torch():
            out = _Run(program.graph_module, float64).run(*args)
        out = list(out) if isinstance(out, (tuple, list)) else [out]
        results.append([o for o, kind in zip(out, kinds) if kind == OutputKind.USER_OUTPUT])
    return results


def deviation(ref: Tensor, got: Tensor, atol: float = 0.0) -> float:
    """Normwise deviation of ``got`` from ``ref``: ``(max|got - ref| - atol) / max|ref|`` over the finite
    values; infinite when the shapes, the non-finite values, or any integer value differ (or, for
    an output that is no tensor, when it differs at all)."""
    if not isinstance(ref, Tensor):
        return 0.0 if ref == got else math.inf
    if not isinstance(got, Tensor) or ref.shape != got.shape:
        return math.inf
    if not ref.is_floating_point():
        return 0.0 if torch.equal(ref, got) else math.inf
    r, g = ref.detach().to(F64), got.detach().to(F64)
    finite = torch.isfinite(r)
    if not torch.equal(finite, torch.isfinite(g)) or not torch.equal(r.isnan(), g.isnan()):
        return math.inf
    infinite = torch.isinf(r)
    if not torch.equal(r[infinite], g[infinite]):
        return math.inf
    if not finite.any():
        return 0.0
    error = max(0.0, float((r[finite] - g[finite]).abs().max()) - atol)
    scale = float(r[finite].abs().max())
    if error == 0.0:
        return 0.0
    return error / scale if scale > 0 else math.inf


@dataclass(frozen=True)
class Check:
    """One comparison of a folded program with the original: the largest deviation and where."""

    deviation: float
    where: str

    def passed(self, bound: float) -> bool:
        return self.deviation <= bound


class Prover:
    """Runs the original program once on the proof's inputs, then checks folded programs
    against it; ``other_size`` (a program with free image sizes) adds a probe with each image-like
    input at that size (``None`` for the others). ``float64`` is False when the model could not run in float64 (then it checks in
    the model's own dtypes with verification's float32 tolerance; ``note`` says why)."""

    def __init__(
        self,
        program: ExportedProgram,
        example_inputs: Sequence[Tensor],
        dynamic_batch: bool,
        other_size: Sequence[tuple[int, int] | None] | None = None,
    ) -> None:
        self.runs, self.inputs, self.samples = probe_inputs(example_inputs, dynamic_batch)
        self.names = ["the example and the probe"] if dynamic_batch else ["the example", *PROBES]
        if other_size is not None:  # a program with free image sizes: the probe at another size too
            self.runs.append(resized_probe(example_inputs, other_size))
            self.names.append("the probe at " + ", ".join(f"{h}x{w}" for h, w in filter(None, other_size)))
            self.inputs, self.samples = self.inputs + 1, self.samples + 1
        self.float64, self.note = True, None
        try:
            self.reference = run_program(program, self.runs, float64=True)
        except Exception as exc:  # an op without a float64 kernel raises whatever its backend raises
            try:
                self.reference = run_program(program, self.runs, float64=False)
            except Exception as exc2:
                raise FoldError(
                    "the program torch.export captured from the model fails when run "
                    f"({type(exc2).__name__}: {first_line(exc2)}), so it does not compute what the model "
                    "does. A forward that assigns a registered buffer (an anchor grid made on the first "
                    "call) is captured as an in-place copy into it: register the buffer with its final "
                    "shape, or run the model once before exporting it"
                ) from exc2
            self.float64 = False
            self.note = f"the model cannot run in float64 ({type(exc).__name__}: {first_line(exc)})"
            warnings.warn(
                f"bnfold: {self.note}; the fold is checked in float32 instead, which cannot prove it exact",
                stacklevel=2,
            )
        self.bound = PROOF_RTOL if self.float64 else DEFAULT_RTOL

    def check(self, program: ExportedProgram, exact: Mapping[str, Callable[[], Tensor]] | None = None) -> Check:
        """The largest deviation of ``program``'s outputs (its new tensors given by ``exact``)
        from the original's."""
        got = run_program(program, self.runs, float64=self.float64, exact=exact)
        worst = Check(0.0, "")
        for name, refs, outs in zip(self.names, self.reference, got):
            if len(refs) != len(outs):
                return Check(math.inf, f"the number of outputs on {name} ({len(outs)} instead of {len(refs)})")
            for i, (r, g) in enumerate(zip(refs, outs)):
                dev = deviation(r, g, atol=0.0 if self.float64 else DEFAULT_ATOL)
                if dev > worst.deviation or (math.isnan(dev) and not math.isnan(worst.deviation)):
                    label = "the output" if len(refs) == 1 else f"output {i}"
                    worst = Check(dev, f"{label} on {name}")
        return worst

    def report(self, check: Check, undone: Sequence[str] = ()) -> ProofReport:
        return ProofReport(
            dtype="float64" if self.float64 else "float32",
            inputs=self.inputs,
            samples=self.samples,
            max_deviation=check.deviation,
            bound=self.bound,
            undone=list(undone),
            note=self.note,
        )


def copy_program(program: ExportedProgram) -> ExportedProgram:
    """A copy of ``program`` to fold: its own graph, signature and tensor tables; the tensors
    themselves are shared (folding adds tensors, it never changes one)."""
    with quiet_torch():  # copying pytree specs warns of torch's own deprecations
        gm = copy.deepcopy(program.graph_module)
        signature = copy.deepcopy(program.graph_signature)
        # The copy may rename a node whose name shadows a builtin (``input`` -> ``input_1``).
        renamed = {old.name: new.name for old, new in zip(program.graph.nodes, gm.graph.nodes) if old.name != new.name}
        for spec in [*signature.input_specs, *signature.output_specs]:
            name = getattr(spec.arg, "name", None)
            if name in renamed:
                spec.arg = dataclasses.replace(spec.arg, name=renamed[name])
        return program._update(gm, signature, state_dict=dict(program.state_dict), constants=dict(program.constants))


class Attempt(Protocol):
    """One fold of a copy of the captured program: the folded copy, the rewrites it applied (in
    order, by name), what the skipped names undid (for the report), and ``finalize``, which casts
    its new tensors to their dtypes."""

    @property
    def program(self) -> ExportedProgram: ...

    @property
    def applied(self) -> list[str]: ...

    @property
    def undone(self) -> list[str]: ...

    def exact_values(self) -> dict[str, Callable[[], Tensor]]: ...

    def finalize(self) -> None: ...


def proven_fold(
    program: ExportedProgram,
    fold_copy: Callable[[ExportedProgram, Mapping[str, str]], Attempt],
    prover: Prover,
) -> tuple[Attempt, Check]:
    """Fold copies of ``program`` with ``fold_copy`` until the proof passes: each failure undoes
    the rewrite responsible (found by bisection) with the reason "float64 proof failed: ...".
    ``program`` itself is never changed. Returns the proven attempt, finalized (its new tensors
    cast to their dtypes), and its check."""
    skip: dict[str, str] = {}

    def attempt(extra: Mapping[str, str] = {}) -> tuple[Attempt, Check]:
        result = fold_copy(copy_program(program), {**skip, **extra})
        if not prover.float64:
            result.finalize()
        return result, prover.check(result.program, result.exact_values())

    result, check = attempt()
    checked_nothing_folded = False
    while not check.passed(prover.bound):
        applied = list(result.applied)
        if not checked_nothing_folded:
            _, bare = attempt(dict.fromkeys(applied, "bisecting"))
            if not bare.passed(prover.bound):
                raise FoldError(
                    "the model does not compute the same outputs twice on the same inputs "
                    f"({bare.where} differs by {bare.deviation:.3g}): it is not deterministic in eval "
                    "mode, so no fold can be proven; remove the randomness from its forward"
                )
            checked_nothing_folded = True
        low, high, failing = 0, len(applied), check  # folding applied[:low] passes, applied[:high] fails
        while high - low > 1:
            middle = (low + high) // 2
            _, trial = attempt(dict.fromkeys(applied[middle:], "bisecting"))
            if trial.passed(prover.bound):
                low = middle
            else:
                high, failing = middle, trial
        culprit = applied[high - 1]
        skip[culprit] = (
            f"float64 proof failed: with this rewrite, {failing.where} differed from the original by "
            f"{failing.deviation:.3g} (bound {prover.bound:g}), so it was undone"
        )
        result, check = attempt()
    if prover.float64:
        result.finalize()
    return result, check
