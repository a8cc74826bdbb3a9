"""Verification: ONNX Runtime on the exported file against the original module in eval mode."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from torch import nn

from .batching import plan_batches
from .defaults import DEFAULT_ATOL, DEFAULT_RTOL, FP16_ATOL, FP16_RTOL, check_verification_settings
from .errors import BnfoldError, Param, UsageError
from .metadata import WEIGHT_DTYPE_KEY
from .predictor import Predictor, TensorSpec
from .progress import Progress
from .reference import DATA_CHUNK, InputsArg, load_inputs, reference_outputs
from .report import Int8Report, OutputCheck, VerifyReport
from .user_module import module_device, module_dtype, quiet_torch

# Two batch sizes, neither the capture's example batch of 2 (a size baked into the graph by
# mistake would pass there); small, since each sample already covers every channel.
RANDOM_BATCH_SIZES = (1, 3)
# Against a float64 run, the ONNX model may be this many times as far as the float32 original:
# two float32 evaluations of the same network, summing in different orders (ONNX Runtime's MLAS
# and PyTorch's kernels), round differently. Measured on ill-conditioned correct exports: 0.97 to
# 2.2 times (tests/test_verification.py); a fold with one channel 0.1% off is 280 to 680 times as far.
FLOAT32_ERROR_FACTOR = 4.0
LOW_PRECISION_ONNX = {"float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16}


def random_inputs(
    specs: Sequence[TensorSpec], batch: int, seed: int, image_sizes: Mapping[str, tuple[int, int]] | None = None
) -> dict[str, np.ndarray]:
    """Seeded standard-normal arrays of every input's shape with the given batch size; a
    dynamic-size input at its height and width in ``image_sizes``."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        shape = spec.shape[1:]
        if image_sizes and spec.name in image_sizes:
            shape = (*shape[:-2], *image_sizes[spec.name])
        free = [d for d in shape if not isinstance(d, int)]
        if free:
            raise UsageError(
                f"input '{spec.name}' has free dimensions {free}: pass ", Param("inputs"), " with real data"
            )
        out[spec.name] = rng.standard_normal((batch, *shape)).astype(np.float32)
    return out


def other_size_inputs(predictor: Predictor, seed: int) -> list[dict[str, np.ndarray]]:
    """For a dynamic-size model: seeded random inputs of one sample (the static batch if fixed)
    at each size besides the example's that verification tries (see
    :meth:`bnfold.image_sizes.ImageSizes.verification_sizes`); none for a model of fixed size."""
    plans = {name: rule.verification_sizes() for name, rule in predictor.image_sizes.items()}
    count = max((len(plan) for plan in plans.values()), default=0)
    batch = predictor.static_batch or 1
    return [
        random_inputs(predictor.inputs, batch, seed + k, {n: p[k] if k < len(p) else p[0] for n, p in plans.items()})
        for k in range(1, count)
    ]


@dataclass
class _Accumulator:
    name: str
    max_abs: float = 0.0
    ref_max: float = 0.0
    rows: int = 0
    decidable: int = 0
    mismatches: int = 0
    agree: int = 0
    shape_problem: str | None = None
    nonfinite: bool = False
    """NaN or inf in the ONNX output."""
    original_error: float | None = None
    """With a float64 reference: max error of the float32 original against it (an allowance)."""

    def add(self, ref: np.ndarray, got: np.ndarray, original: np.ndarray | None = None, counted: bool = True) -> None:
        """Compare ``got`` with ``ref``; ``original`` is the float32 model's output when ``ref``
        is a float64 run, whose own error is then allowed on top of the tolerance."""
        if original is not None and original.shape == ref.shape and ref.size:
            err = float(np.abs(original.astype(np.float64) - ref.astype(np.float64)).max())
            self.original_error = max(self.original_error or 0.0, err)
        if ref.shape != got.shape:
            self.shape_problem = f"output '{self.name}' has shape {got.shape} in ONNX but {ref.shape} in PyTorch"
            return
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        diff = np.abs(got64 - ref64)
        finite = bool(np.isfinite(got64).all())
        self.nonfinite |= not finite
        if ref.size:
            self.max_abs = max(self.max_abs, float(diff.max()) if finite else float("inf"))
            self.ref_max = max(self.ref_max, float(np.abs(ref64).max()))
        if counted and ref.ndim == 2 and ref.shape[1] >= 2:
            top2 = np.sort(ref64, axis=1)[:, -2:]
            margin = top2[:, 1] - top2[:, 0]
            same = ref64.argmax(axis=1) == got64.argmax(axis=1)
            # Top-1 must agree wherever the reference margin exceeds this batch's max error.
            decidable = margin > (float(diff.max()) if finite else np.inf)
            self.rows += ref.shape[0]
            self.agree += int(same.sum())
            self.decidable += int(decidable.sum())
            self.mismatches += int((decidable & ~same).sum())

    def check(self, rtol: float, atol: float) -> OutputCheck:
        tolerance = atol + rtol * self.ref_max + FLOAT32_ERROR_FACTOR * (self.original_error or 0.0)
        scale = self.ref_max or 1.0
        return OutputCheck(
            name=self.name,
            max_abs_error=self.max_abs,
            max_rel_error=self.max_abs / self.ref_max if self.ref_max else self.max_abs,
            ref_max_abs=self.ref_max,
            tolerance=tolerance,
            argmax_rows=self.rows,
            argmax_decidable_rows=self.decidable,
            argmax_mismatches=self.mismatches,
            argmax_agreement=self.agree / self.rows if self.rows else None,
            passed=self.max_abs <= tolerance and self.mismatches == 0,
            float64_rel_error_original=None if self.original_error is None else self.original_error / scale,
            float64_rel_error_onnx=None if self.original_error is None else self.max_abs / scale,
        )


def default_tolerances(
    low_precision: bool, rtol: float | None = None, atol: float | None = None
) -> tuple[float, float]:
    """``(rtol, atol)``: the given values, else the float32 or float16/bfloat16 defaults."""
    default_rtol, default_atol = (FP16_RTOL, FP16_ATOL) if low_precision else (DEFAULT_RTOL, DEFAULT_ATOL)
    return (default_rtol if rtol is None else rtol), (default_atol if atol is None else atol)


def is_low_precision_onnx(predictor: Predictor) -> bool:
    """Whether the model that ``predictor`` runs has float16 or bfloat16 weights: as bnfold's
    export records in the metadata, else (a file from elsewhere) as its initializers say, read
    with ``onnx`` without external data. A file ``onnx`` cannot parse counts as float32 (the
    stricter tolerances)."""
    recorded = predictor.metadata.get(WEIGHT_DTYPE_KEY)
    if recorded is not None:
        return recorded in LOW_PRECISION_ONNX
    try:
        graph = onnx.load(predictor.path, load_external_data=False).graph
    except (OSError, DecodeError):
        return False
    return any(t.data_type in LOW_PRECISION_ONNX.values() for t in graph.initializer)


def float64_copy(module: nn.Module) -> nn.Module:
    """A float64 copy of ``module`` for the float64 reference (the original is left as it is)."""
    try:
        with quiet_torch():
            return copy.deepcopy(module).double()
    except Exception as exc:
        raise BnfoldError(
            "the model cannot be copied to float64 for ",
            Param("reference", "float64"),
            f": {type(exc).__name__}: {exc}",
        ) from exc


def verify(
    module: nn.Module,
    onnx_path: str | os.PathLike[str],
    inputs: InputsArg = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    reference: str = "float32",
    progress: Progress | None = None,
) -> VerifyReport | Int8Report:
    """Compare ONNX Runtime (CPU, graph optimizations off) on ``onnx_path`` with ``module`` in
    eval mode under ``no_grad``.

    An INT8 model (exported with ``int8=True``) is judged instead by the INT8 check against the
    accuracy budget stored in its metadata, on every sample of ``inputs`` (required), and an
    :class:`Int8Report` is returned; ``rtol``, ``atol`` and ``reference`` do not apply to it.

    ``rtol``/``atol`` default to 1e-4/1e-5, or 1e-2/1e-3 for a float16 ONNX model or a
    float16/bfloat16 module. ``inputs``: a ``.npy``/``.npz`` path, an array or a name -> array map; by default seeded
    random-normal inputs of the model's input shapes at batch sizes 1 and 3 (only the fixed
    batch when the batch axis is static). A dynamic-size model (image sizes in its metadata)
    also runs, with the same tolerances, one seeded random sample at each of two other sizes
    it takes (smaller and larger, not square). Returns the report; it does not raise on failure.

    ``reference="float64"`` compares with a float64 copy of ``module`` instead, reports the
    normwise error of the float32 original and of the ONNX model against it (what folding adds),
    and allows :data:`FLOAT32_ERROR_FACTOR` times the original's own error on top of the tolerance. With the float32 reference, a
    comparison that fails on the numbers alone is arbitrated that way before it fails (see
    :func:`_arbitrate`); the report says so (``float64_arbitration``).
    """
    check_verification_settings(rtol, atol, reference)
    progress = progress or Progress()
    # ORT and PyTorch take turns on the same cores: ORT threads spinning after a run would slow PyTorch down.
    predictor = Predictor(onnx_path, device="cpu", optimize=False, spin_wait=False)
    if predictor.int8 is not None:
        return _verify_int8(module, predictor, inputs, rtol, atol, reference)
    module64 = float64_copy(module) if reference == "float64" else None
    ref_dtype = module_dtype(module)
    if rtol is None or atol is None:  # float16 weights or module pick the default tolerances
        low_precision = ref_dtype in (torch.float16, torch.bfloat16) or is_low_precision_onnx(predictor)
        rtol, atol = default_tolerances(low_precision, rtol, atol)
    specs = predictor.inputs
    dynamic = all(s.batch_is_dynamic for s in specs)
    examples = {name: rule.example for name, rule in predictor.image_sizes.items()}
    if inputs is None:
        sizes = RANDOM_BATCH_SIZES if dynamic else (predictor.static_batch or 1,)
        batches = [(random_inputs(specs, b, seed + i, examples), True) for i, b in enumerate(sizes)]
        source = f"random normal, seed {seed}"
    else:
        arrays = load_inputs(inputs, specs)
        chunk = DATA_CHUNK if dynamic else predictor.static_batch or DATA_CHUNK
        # A dynamic batch axis also runs the first sample alone: a second batch size, not counted twice.
        plan = plan_batches(len(next(iter(arrays.values()))), chunk, first_alone=dynamic)
        batches = [(batch.take(arrays), not batch.repeated) for batch in plan]
        source = f"{inputs}" if isinstance(inputs, (str, os.PathLike)) else "given arrays"
    others = other_size_inputs(predictor, seed + len(batches))
    if others:
        batches += [(feeds, True) for feeds in others]
        source += "; other image sizes: random normal" if inputs is not None else ""
    if module64 is not None:
        source += "; float64 reference"
    progress.start("Verifying in ONNX Runtime")
    accs, checks = _compare(module, module64, predictor, batches, progress)
    progress.finish()
    arbitration = None
    if module64 is None and not checks and any(not a.check(rtol, atol).passed for a in accs):
        arbitration, accs, checks, source = _arbitrate(module, predictor, batches, accs, rtol, atol, source, progress)
    samples = sum(next(iter(b.values())).shape[0] for b, counted in batches if counted)
    return VerifyReport(
        onnx_path=str(onnx_path),
        rtol=rtol,
        atol=atol,
        input_source=source,
        batch_sizes=sorted({next(iter(b.values())).shape[0] for b, _ in batches}),
        image_sizes=_image_sizes(predictor, batches),
        samples=samples,
        outputs=[a.check(rtol, atol) for a in accs],
        checks=checks,
        float64_arbitration=arbitration,
    )


def _image_sizes(predictor: Predictor, batches: list[tuple[dict[str, np.ndarray], bool]]) -> list[str]:
    """The ``HxW`` sizes of a dynamic-size model's first image input that verification ran, in
    order (empty for a model of fixed size)."""
    name = next(iter(predictor.image_sizes), None)
    if name is None:
        return []
    return list(dict.fromkeys(f"{b[name].shape[-2]}x{b[name].shape[-1]}" for b, _ in batches))


def _verify_int8(
    module: nn.Module, predictor: Predictor, inputs: InputsArg, rtol: float | None, atol: float | None, reference: str
) -> Int8Report:
    """An INT8 model is judged by its accuracy budget on real data, not by float tolerances."""
    if rtol is not None or atol is not None or reference != "float32":
        raise UsageError(
            Param("rtol"),
            ", ",
            Param("atol"),
            " and ",
            Param("reference"),
            f" do not apply to {predictor.path}, an INT8 model: it is checked against the accuracy budget stored at export",
        )
    if inputs is None:
        raise UsageError(
            f"{predictor.path} is an INT8 model: give ",
            Param("inputs"),
            " (real data held apart from its calibration data; random inputs fall outside its calibrated ranges)",
        )
    from .quantization.check import verify_int8  # ONNX Runtime's quantization tool: only for INT8 models

    return verify_int8(module, predictor.path, inputs, predictor.int8)


def _compare(
    module: nn.Module,
    module64: nn.Module | None,
    predictor: Predictor,
    batches: list[tuple[dict[str, np.ndarray], bool]],
    progress: Progress,
) -> tuple[list[_Accumulator], dict[str, str]]:
    """Run ``module`` (and ``module64``, the float64 reference, if given) and the ONNX model on
    every batch: the per-output accumulators and the structural failures."""
    specs = predictor.inputs
    accs = [_Accumulator(s.name) for s in predictor.outputs]
    checks: dict[str, str] = {}
    device, ref_dtype = module_device(module), module_dtype(module)
    for step, (feeds, counted) in enumerate(batches):
        # PyTorch first, then ONNX Runtime: PyTorch's activations are freed before ORT runs, so
        # ORT reuses that memory instead of adding to the peak.
        tensors = [torch.from_numpy(np.ascontiguousarray(feeds[s.name])).to(device) for s in specs]
        ref = reference_outputs(module, [t.to(ref_dtype) for t in tensors])
        ref64 = reference_outputs(module64, [t.double() for t in tensors]) if module64 is not None else None
        got = predictor.run({s.name: predictor.check_input(s, feeds[s.name]) for s in specs})
        if len(ref) != len(got):
            checks["outputs"] = f"the ONNX model has {len(got)} output(s), the PyTorch model {len(ref)}"
            break
        for i, (acc, r, g) in enumerate(zip(accs, ref, got)):
            if (r.dtype.is_floating_point) != (g.dtype.kind == "f"):
                checks[f"dtype:{acc.name}"] = f"output '{acc.name}' is {g.dtype} in ONNX but {r.dtype} in PyTorch"
            r_np = r.detach().cpu().numpy()
            if not np.isfinite(r_np).all():
                raise BnfoldError(
                    f"the original model's output '{acc.name}' contains NaN/inf on the verification "
                    "inputs: fix the model (or its statistics) before exporting"
                )
            if ref64 is None:
                acc.add(r_np, g, counted=counted)
            else:
                acc.add(ref64[i].cpu().numpy(), g, original=r_np, counted=counted)
        progress.advance(step + 1, len(batches))
    checks.update({f"shape:{a.name}": a.shape_problem for a in accs if a.shape_problem})
    checks.update(
        {
            f"nonfinite:{a.name}": f"output '{a.name}' has NaN/inf in ONNX but not in PyTorch"
            for a in accs
            if a.nonfinite
        }
    )
    return accs, checks


def _arbitrate(
    module: nn.Module,
    predictor: Predictor,
    batches: list[tuple[dict[str, np.ndarray], bool]],
    accs: list[_Accumulator],
    rtol: float,
    atol: float,
    source: str,
    progress: Progress,
) -> tuple[str | None, list[_Accumulator], dict[str, str], str]:
    """The float32 comparison failed on the numbers alone: an ill-conditioned model can amplify
    float32 rounding until the original and a correct ONNX model differ by more than the
    tolerance. Judge the ONNX model against a float64 run instead: it passes when it is no
    farther from the float64 truth than the float32 original's own rounding (up to
    :data:`FLOAT32_ERROR_FACTOR` times it) plus the tolerance; a wrong fold is hundreds of times
    farther. Returns the sentence for the report and the float64 comparison; a model that
    cannot be copied to float64 keeps the float32 verdict."""
    try:
        module64 = float64_copy(module)
    except BnfoldError:
        return None, accs, {}, source
    failed = "; ".join(
        f"'{a.name}' max abs error {a.max_abs:.3g} > {a.check(rtol, atol).tolerance:.3g}"
        for a in accs
        if not a.check(rtol, atol).passed
    )
    progress.start("Float64 arbitration")
    accs64, checks64 = _compare(module, module64, predictor, batches, progress)
    progress.finish()
    verdict = "passes" if all(a.check(rtol, atol).passed for a in accs64) and not checks64 else "fails"
    sentence = (
        f"the float32 comparison failed ({failed}); float64 arbitration decided: the ONNX model {verdict} "
        "against a float64 run, allowing the float32 original's own error"
    )
    return sentence, accs64, checks64, source + "; float64 arbitration"
