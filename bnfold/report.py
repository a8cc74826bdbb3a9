"""Report dataclasses: what folding did to every batch-norm, and what verification measured."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from .image_sizes import ImageSizes

FOLDED = "folded"
KEPT = "kept"
BATCH_NORM_OP = "batch_norm"
AFFINE_OP = "affine"


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as strings ("inf", "nan"), so ``json.dump`` writes JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join("  " + line for line in lines)


@dataclass(frozen=True)
class BatchNormEntry:
    """One batch-norm call site of the model and what happened to it."""

    name: str
    """Module path of the batch-norm (e.g. ``layer1.0.bn1``), or the graph node name."""
    kind: str
    """Module class (``BatchNorm2d``) or ``batch_norm`` for a functional call."""
    channels: int
    status: str
    """``"folded"`` or ``"kept"``."""
    into: str | None = None
    """The layer the batch-norm was folded into."""
    pattern: str | None = None
    """The rewrite that folded it, e.g. ``Conv2d → BatchNorm``."""
    reason: str | None = None
    """Why it was kept (exported as an exact BatchNormalization op)."""
    category: str | None = None
    """The reason's class, without layer names (e.g. ``after Concat of shared features``)."""
    op: str = BATCH_NORM_OP
    """``"batch_norm"`` for a batch-norm op, ``"affine"`` for a constant per-channel affine map
    built from element-wise ops (``FrozenBatchNorm2d``, a layer scale, input normalisation)."""

    @property
    def detail(self) -> str:
        """One human-readable phrase: where it went or why it stayed."""
        if self.status == FOLDED:
            return f"into {self.into} ({self.pattern})"
        return f"kept: {self.reason}"


@dataclass(frozen=True)
class ProofReport:
    """The check that the folded program computes the same function as the original: in float64
    (exact up to rounding), or in float32 when the model cannot run in float64 (``note`` says why)."""

    dtype: str
    """``"float64"``, or ``"float32"`` for the fallback."""
    inputs: int
    """Input sets compared: the example inputs and the seeded probes."""
    samples: int
    """Samples (batch rows) in all of them."""
    max_deviation: float
    """Largest normwise deviation of any output: ``max|y_folded - y| / max|y|``."""
    bound: float
    """The largest deviation allowed."""
    undone: list[str] = field(default_factory=list)
    """Batch-norms whose rewrite the proof found wrong: undone and kept."""
    note: str | None = None

    @property
    def passed(self) -> bool:
        return self.max_deviation <= self.bound

    def __str__(self) -> str:
        what = "Float64 proof" if self.dtype == "float64" else "Float32 check (NOT a float64 proof)"
        line = (
            f"{what}: the folded model matches the original on {self.inputs} inputs ({self.samples} samples), "
            f"max deviation {self.max_deviation:.2e} of the output scale (bound {self.bound:g})"
        )
        if self.undone:
            line += f"; {len(self.undone)} rewrite(s) found wrong and undone: {', '.join(self.undone)}"
        return line + (f"; {self.note}" if self.note else "")


@dataclass
class FoldReport:
    """Every batch-norm of the model: folded into which layer, or kept and why; and the proof
    that the fold computes the same function."""

    entries: list[BatchNormEntry] = field(default_factory=list)
    dynamic_batch: bool = True
    proof: ProofReport | None = None
    image_sizes: tuple[ImageSizes | None, ...] | None = None
    """With a dynamic image size: the heights and widths each input takes (``None`` for an input
    that is not image-like); ``None`` when the size is fixed."""

    def size_summary(self) -> str:
        """``fixed``, or ``dynamic`` and the sizes each image-like input takes."""
        if self.image_sizes is None:
            return "fixed"
        inputs = [(i, s) for i, s in enumerate(self.image_sizes) if s is not None]
        one = len(self.image_sizes) == 1
        return "dynamic, " + ", ".join(
            f"{'' if one else f'input {i}: '}{s} (traced at {s.example[0]}x{s.example[1]})" for i, s in inputs
        )

    @property
    def folded_count(self) -> int:
        return sum(e.status == FOLDED for e in self.entries)

    @property
    def kept_count(self) -> int:
        return sum(e.status == KEPT for e in self.entries)

    @property
    def kept_batchnorm_ops(self) -> int:
        """Kept entries that are batch-norm ops: the BatchNormalization nodes the ONNX graph keeps."""
        return sum(e.status == KEPT and e.op == BATCH_NORM_OP for e in self.entries)

    def kept_by_reason(self) -> dict[str, int]:
        """Number of kept batch-norms per reason class, most frequent first."""
        return dict(Counter(e.category or e.reason or "" for e in self.entries if e.status == KEPT).most_common())

    def summary(self) -> str:
        affines = sum(e.op == AFFINE_OP for e in self.entries)
        counted = f"{len(self.entries) - affines} batch-norm(s)" + (
            f" and {affines} per-channel affine(s)" if affines else ""
        )
        return f"{counted}: {self.folded_count} folded, {self.kept_count} kept"

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_norms": sum(e.op == BATCH_NORM_OP for e in self.entries),
            "affines": sum(e.op == AFFINE_OP for e in self.entries),
            "folded": self.folded_count,
            "kept": self.kept_count,
            "kept_by_reason": self.kept_by_reason(),
            "dynamic_batch": self.dynamic_batch,
            "dynamic_size": self.image_sizes is not None,
            "image_sizes": None if self.image_sizes is None else [s and s.to_dict() for s in self.image_sizes],
            "proof": None if self.proof is None else _json_safe(asdict(self.proof)),
            "entries": [asdict(e) for e in self.entries],
        }

    def __str__(self) -> str:
        lines = [f"Fold report: {self.summary()}"]
        if self.entries:
            rows = [[e.name, e.kind, str(e.channels), e.status, e.detail] for e in self.entries]
            lines.append(_table(["layer", "type", "ch", "status", "detail"], rows))
        kept = self.kept_by_reason()
        if kept:
            lines.append("  kept, by reason: " + "; ".join(f"{reason}: {count}" for reason, count in kept.items()))
        if self.image_sizes is not None:
            lines.append(f"  Image size: {self.size_summary()}")
        if self.proof is not None:
            lines.append(f"  {self.proof}")
        return "\n".join(lines)


@dataclass(frozen=True)
class OutputCheck:
    """Agreement of one model output between the reference and the ONNX model."""

    name: str
    max_abs_error: float
    max_rel_error: float
    """Normwise: ``max|y - y_ref| / max|y_ref|``."""
    ref_max_abs: float
    tolerance: float
    """``atol + rtol * max|y_ref|`` (plus, against a float64 reference, the float32 original's own
    max error); the output passes when ``max_abs_error <= tolerance``."""
    argmax_rows: int
    """Rows compared for top-1 agreement (2-D outputs only; 0 otherwise)."""
    argmax_decidable_rows: int
    """Rows whose reference top-2 margin exceeds the max abs error of their batch."""
    argmax_mismatches: int
    """Top-1 disagreements among the decidable rows (must be 0 to pass)."""
    argmax_agreement: float | None
    """Fraction of all compared rows with the same top-1 (informational)."""
    passed: bool
    float64_rel_error_original: float | None = None
    """With a float64 reference: normwise error of the float32 original model against it."""
    float64_rel_error_onnx: float | None = None
    """With a float64 reference: normwise error of the ONNX model against it."""


@dataclass
class VerifyReport:
    """What verification compared and measured, and whether it passed."""

    onnx_path: str
    rtol: float
    atol: float
    input_source: str
    batch_sizes: list[int]
    samples: int
    outputs: list[OutputCheck] = field(default_factory=list)
    checks: dict[str, str] = field(default_factory=dict)
    """Structural checks beyond the numbers (e.g. BatchNormalization count), name -> failure."""
    float64_arbitration: str | None = None
    """Set when the float32 comparison failed and a float64 run decided: what happened."""
    image_sizes: list[str] = field(default_factory=list)
    """A dynamic-size model: the image sizes (``HxW``) compared, the example's first."""

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs) and not self.checks

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        return _json_safe(data)

    def failures(self) -> list[str]:
        """One sentence per failed output or check."""
        out = [
            f"output '{o.name}': max abs error {o.max_abs_error:.3g} > tolerance {o.tolerance:.3g}"
            if o.max_abs_error > o.tolerance
            else f"output '{o.name}': top-1 differs on {o.argmax_mismatches} sample(s) with a clear margin"
            for o in self.outputs
            if not o.passed
        ]
        return out + list(self.checks.values())

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"Verification {verdict}: ONNX Runtime vs eval-mode PyTorch on {self.samples} sample(s) "
            f"({self.input_source}; batch sizes {', '.join(map(str, self.batch_sizes))}"
            + (f"; image sizes {', '.join(self.image_sizes)}" if self.image_sizes else "")
            + ")",
        ]
        if any(o.float64_rel_error_onnx is not None for o in self.outputs):
            lines.append(
                f"  pass iff max|y - y64| <= atol + rtol * max|y64| + 4 * max|y32 - y64|   (rtol={self.rtol:g}, atol={self.atol:g})"
            )
        else:
            lines.append(
                f"  pass iff max|y - y_ref| <= atol + rtol * max|y_ref|   (rtol={self.rtol:g}, atol={self.atol:g})"
            )
        if self.float64_arbitration:
            lines.append(f"  {self.float64_arbitration}")
        rows = [
            [
                o.name,
                f"{o.max_abs_error:.3e}",
                f"{o.max_rel_error:.3e}",
                f"{o.tolerance:.3e}",
                "-" if o.argmax_agreement is None else f"{100 * o.argmax_agreement:.2f}%",
                "pass" if o.passed else "FAIL",
            ]
            for o in self.outputs
        ]
        lines.append(_table(["output", "max abs err", "max rel err", "tolerance", "top-1 agree", ""], rows))
        f64 = [o for o in self.outputs if o.float64_rel_error_onnx is not None]
        if f64:
            lines.append("  normwise error against the float64 run (its own error is allowed for the ONNX model):")
            rows = [[o.name, f"{o.float64_rel_error_original:.3e}", f"{o.float64_rel_error_onnx:.3e}"] for o in f64]
            lines.append(_table(["output", "original fp32", "folded ONNX"], rows))
        lines.extend(f"  FAILED: {m}" for m in self.checks.values())
        return "\n".join(lines)


@dataclass(frozen=True)
class RecalibratedLayer:
    """How recalibration moved one batch-norm's statistics."""

    name: str
    channels: int
    values_per_channel: int
    """Values each channel's statistics were computed over (samples x spatial positions)."""
    max_mean_shift: float
    """``max |new mean - old mean|`` over channels."""
    var_ratio_min: float
    var_ratio_max: float
    """Range over channels of ``new variance / old variance``."""


@dataclass
class RecalibrationReport:
    """Per-layer shift of the running statistics after :func:`bnfold.recalibrate`."""

    layers: list[RecalibratedLayer]
    samples: int
    batches: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"Recalibrated {len(self.layers)} batch-norm(s) on {self.samples} sample(s) in {self.batches} batch(es)"
        ]
        rows = [
            [x.name, str(x.channels), f"{x.max_mean_shift:.3e}", f"{x.var_ratio_min:.3f} .. {x.var_ratio_max:.3f}"]
            for x in self.layers
        ]
        if rows:
            lines.append(_table(["layer", "ch", "max |mean shift|", "var new/old"], rows))
        return "\n".join(lines)


INT8 = "int8"
FLOAT = "float"


@dataclass(frozen=True)
class Int8Output:
    """How far one output of the INT8 model is from the float32 PyTorch model on held-out data."""

    name: str
    sqnr_db: float
    """Signal-to-quantization-noise ratio: ``10·log10(Σ y_ref² / Σ (y - y_ref)²)`` (inf: identical)."""
    max_rel_error: float
    """Normwise: ``max|y - y_ref| / max|y_ref|`` (reported, not judged: one outlier sets it)."""
    top1_agreement: float | None
    """Fraction of rows with the same top-1 (2-D ``[N, C]`` outputs, C >= 2); ``None`` otherwise."""
    passed: bool
    problem: str | None = None
    """What made it fail besides the numbers (NaN/inf, another shape)."""


@dataclass(frozen=True)
class Int8Layer:
    """One weight layer (Conv, ConvTranspose, Gemm, MatMul) of the model: quantized or left in float."""

    name: str
    """The PyTorch module it came from (e.g. ``layers.0.conv1``), else the ONNX node name."""
    node: str
    """The ONNX node."""
    op_type: str
    status: str
    """``"int8"`` or ``"float"``."""
    reason: str | None = None
    """Why it stayed float."""
    sensitivity_db: float | None = None
    """Measured only when the budget failed: how many dB the lowest output SQNR gains (on the
    calibration samples) when this layer alone is left in float."""


@dataclass
class Int8Report:
    """What INT8 quantization did and how the INT8 model compares with the PyTorch model."""

    calibration_method: str
    calibration_samples: int
    verification_samples: int
    data_source: str
    split: str
    """How the data was split between calibration and verification."""
    min_agreement: float
    min_sqnr_db: float
    max_float_layers: int
    outputs: list[Int8Output] = field(default_factory=list)
    layers: list[Int8Layer] = field(default_factory=list)
    attempts: list[str] = field(default_factory=list)
    """One line per quantization tried: which layers stayed float and the lowest SQNR it reached."""
    fp32_bytes: int = 0
    int8_bytes: int = 0

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    @property
    def float_layers(self) -> list[Int8Layer]:
        return [layer for layer in self.layers if layer.status == FLOAT]

    def failures(self) -> list[str]:
        """One sentence per failed output."""
        out = []
        for o in self.outputs:
            if o.problem:
                out.append(f"output '{o.name}': {o.problem}")
                continue
            if o.top1_agreement is not None and o.top1_agreement < self.min_agreement:
                out.append(
                    f"output '{o.name}': top-1 agreement {100 * o.top1_agreement:.2f}% < {100 * self.min_agreement:g}%"
                )
            if o.sqnr_db < self.min_sqnr_db:
                out.append(f"output '{o.name}': SQNR {o.sqnr_db:.1f} dB < {self.min_sqnr_db:g} dB")
        return out

    def summary(self) -> dict[str, Any]:
        """The facts stored in the INT8 model's metadata."""
        return _json_safe(
            {
                "calibration_method": self.calibration_method,
                "calibration_samples": self.calibration_samples,
                "verification_samples": self.verification_samples,
                "min_agreement": self.min_agreement,
                "min_sqnr_db": self.min_sqnr_db,
                "max_float_layers": self.max_float_layers,
                "float_layers": [layer.name for layer in self.float_layers],
                "top1_agreement": {o.name: o.top1_agreement for o in self.outputs if o.top1_agreement is not None},
                "sqnr_db": {o.name: round(o.sqnr_db, 2) for o in self.outputs},
            }
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        return _json_safe(data)

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        quantized = len(self.layers) - len(self.float_layers)
        layers = f"; {quantized} of {len(self.layers)} weight layer(s) quantized" if self.layers else ""
        lines = [
            f"INT8 check {verdict}: ONNX Runtime INT8 vs eval-mode PyTorch float32 on {self.verification_samples} "
            f"held-out sample(s) ({self.data_source}; {self.split})",
            f"  calibration: {self.calibration_method}, {self.calibration_samples} sample(s); QDQ, per-channel int8 "
            f"weights, uint8 activations{layers}",
            f"  pass iff top-1 agreement >= {100 * self.min_agreement:g}% (classifier outputs) and SQNR >= "
            f"{self.min_sqnr_db:g} dB (every output)",
        ]
        rows = [
            [
                o.name,
                f"{o.sqnr_db:.1f}",
                f"{o.max_rel_error:.3e}",
                "-" if o.top1_agreement is None else f"{100 * o.top1_agreement:.2f}%",
                "pass" if o.passed else "FAIL",
            ]
            for o in self.outputs
        ]
        lines.append(_table(["output", "SQNR dB", "max rel err", "top-1 agree", ""], rows))
        layer_rows = [
            [
                layer.name,
                layer.op_type,
                layer.status,
                "-" if layer.sensitivity_db is None else f"{layer.sensitivity_db:+.1f}",
                layer.reason or "",
            ]
            for layer in self.layers
        ]
        if layer_rows:
            lines.append(_table(["layer", "op", "status", "float gain dB", "reason"], layer_rows))
        if len(self.attempts) > 1:
            lines.extend(f"  tried: {attempt}" for attempt in self.attempts)
        if self.int8_bytes:
            lines.append(
                f"  size: {self.fp32_bytes / 1e6:.2f} MB float32 -> {self.int8_bytes / 1e6:.2f} MB INT8 "
                f"({self.int8_bytes / self.fp32_bytes:.2f}x)"
            )
        lines.extend(f"  FAILED: {m}" for m in self.failures())
        return "\n".join(lines)


@dataclass
class ExportResult:
    """The outcome of :func:`bnfold.export`."""

    path: str
    fold_report: FoldReport
    verify_report: VerifyReport | None
    onnx_batchnorm_count: int
    opset: int
    input_names: list[str]
    output_names: list[str]
    int8_report: Int8Report | None = None
    """With ``int8=True``: the INT8 model written at ``path`` and its check."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "opset": self.opset,
            "input_names": self.input_names,
            "output_names": self.output_names,
            "onnx_batchnorm_count": self.onnx_batchnorm_count,
            "fold": self.fold_report.to_dict(),
            "verify": None if self.verify_report is None else self.verify_report.to_dict(),
            "int8": None if self.int8_report is None else self.int8_report.to_dict(),
        }

    def __str__(self) -> str:
        parts = [str(self.fold_report)]
        parts.append(
            f"ONNX: {self.path} (opset {self.opset}, "
            f"{'dynamic' if self.fold_report.dynamic_batch else 'static'} batch, "
            f"{'dynamic size, ' if self.fold_report.image_sizes is not None else ''}"
            f"{self.onnx_batchnorm_count} BatchNormalization node(s))"
        )
        parts.append("Verification skipped" if self.verify_report is None else str(self.verify_report))
        if self.int8_report is not None:
            parts.append(str(self.int8_report))
        return "\n".join(parts)
