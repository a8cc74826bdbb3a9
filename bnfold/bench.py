"""Measure what folding buys and what it costs: eager PyTorch (original, folded, and the BN-free
floor) and ONNX Runtime (plain ``torch.onnx.export`` vs bnfold, optimizations on and off, and
optionally bnfold's INT8 model), median of interleaved repeated runs after warm-up, plus
session-creation times and file sizes."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxscript import ir
from torch import fx, nn

from .arrays import ArraysArg
from .defaults import CALIBRATION_METHODS
from .errors import Param, UsageError
from .exporting import output_count, to_onnx
from .folding import fold
from .folding.capture import CAPTURE_BATCH, batch_dynamic_shapes, capture, with_batch
from .folding.sites import batchnorm_nodes
from .predictor import Predictor, session_options
from .progress import Progress
from .user_module import quiet_torch, run_eval

EAGER_ORIGINAL = "eager original"
EAGER_FOLDED = "eager folded"
EAGER_FLOOR = "eager BN-free floor"
ORT_PLAIN = "ORT plain export, default opts"
ORT_PLAIN_NOOPT = "ORT plain export, opts disabled"
ORT_BNFOLD = "ORT bnfold, default opts"
ORT_BNFOLD_NOOPT = "ORT bnfold, opts disabled"
ORT_INT8 = "ORT bnfold INT8, default opts"
FILE_FP32, FILE_INT8 = "bnfold float32", "bnfold INT8"
VARIANTS = (EAGER_ORIGINAL, EAGER_FOLDED, EAGER_FLOOR, ORT_PLAIN, ORT_PLAIN_NOOPT, ORT_BNFOLD, ORT_BNFOLD_NOOPT)
"""The variants every run times; ``int8=True`` adds :data:`ORT_INT8`."""


@dataclass
class BenchReport:
    """Median milliseconds per variant and batch size, and the ratios the targets are about."""

    model: str
    batch_sizes: list[int]
    repeats: int
    median_ms: dict[str, dict[int, float]] = field(default_factory=dict)
    session_creation_ms: dict[str, float] = field(default_factory=dict)
    file_bytes: dict[str, int] = field(default_factory=dict)
    """With ``int8``: the sizes of bnfold's float32 and INT8 ONNX files."""

    def ratio(self, a: str, b: str, batch: int) -> float:
        return self.median_ms[a][batch] / self.median_ms[b][batch]

    def ratios(self) -> dict[str, dict[int, float]]:
        """folded/floor (target <= 1.02), folded/original (< 1), bnfold-no-opt/plain-default (<= 1.05)."""
        pairs = {
            "eager folded / BN-free floor": (EAGER_FOLDED, EAGER_FLOOR),
            "eager folded / eager original": (EAGER_FOLDED, EAGER_ORIGINAL),
            "ORT bnfold opts disabled / ORT plain default": (ORT_BNFOLD_NOOPT, ORT_PLAIN),
            "ORT bnfold default / ORT plain default": (ORT_BNFOLD, ORT_PLAIN),
            "ORT bnfold opts disabled / ORT plain opts disabled": (ORT_BNFOLD_NOOPT, ORT_PLAIN_NOOPT),
        }
        if ORT_INT8 in self.median_ms:
            pairs["ORT bnfold INT8 / ORT bnfold default"] = (ORT_INT8, ORT_BNFOLD)
        return {name: {b: self.ratio(x, y, b) for b in self.batch_sizes} for name, (x, y) in pairs.items()}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratios": self.ratios()}

    def __str__(self) -> str:
        head = f"{'variant':34s}" + "".join(f"{'batch ' + str(b):>14s}" for b in self.batch_sizes)
        lines = [f"Benchmark of {self.model}: median ms over {self.repeats} interleaved runs", head]
        for variant, by_batch in self.median_ms.items():
            lines.append(f"{variant:34s}" + "".join(f"{by_batch[b]:14.3f}" for b in self.batch_sizes))
        lines.append("ratios:")
        for name, by_batch in self.ratios().items():
            lines.append(f"  {name:44s}" + "".join(f"{v:9.3f}" for v in by_batch.values()))
        lines.append(
            "session creation (ms): " + ", ".join(f"{k}: {v:.1f}" for k, v in self.session_creation_ms.items())
        )
        if self.file_bytes:
            sizes = ", ".join(f"{k}: {v / 1e6:.2f} MB" for k, v in self.file_bytes.items())
            fp32, int8 = self.file_bytes[FILE_FP32], self.file_bytes[FILE_INT8]
            lines.append(f"file size: {sizes} (INT8 / float32: {int8 / fp32:.3f})")
        return "\n".join(lines)


def bn_free_floor(module: nn.Module, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """The captured model with every batch-norm replaced by its input: what folding cannot beat."""
    gm = capture(module, example_inputs).module()
    for node in batchnorm_nodes(gm.graph):
        replacement = node.args[0]
        output = next(iter(node.users)) if node.target is not torch.ops.aten.batch_norm.default else node
        output.replace_all_uses_with(replacement)
        for n in dict.fromkeys((output, node)):
            gm.graph.erase_node(n)
    gm.recompile()  # no dead-code elimination: it would also drop the input guard the folded model runs
    return gm


def _session(path: Path, optimize: bool) -> ort.InferenceSession:
    # Idle ONNX Runtime threads spin-wait by default; with several sessions and torch timed in
    # turn on the same cores, that spinning would slow down whichever variant runs next.
    options = session_options(optimize, spin_wait=False)
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _creation_ms(path: Path, optimize: bool, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _session(path, optimize)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    name: str = "model",
    batch_sizes: Sequence[int] = (1, 32),
    repeats: int = 10,
    warmup: int = 2,
    progress: Progress | None = None,
    int8: bool = False,
    calibration: ArraysArg | None = None,
) -> BenchReport:
    """Time the variants of ``module`` (see :data:`VARIANTS`) at each batch size, interleaved,
    after ``warmup`` runs each; CPU only (ONNX Runtime's CPU provider, torch's threads).

    ``int8`` also times bnfold's ONNX quantized to INT8 as :func:`bnfold.export` quantizes it
    (calibrated on the calibration part of ``calibration``, every supported layer quantized; its
    accuracy is not checked here) and reports both file sizes."""
    if repeats < 1:
        raise UsageError(Param("repeats"), f" must be at least 1 (got {repeats})")
    if int8 != (calibration is not None):
        raise UsageError(Param("int8", True), " and ", Param("calibration"), " go together")
    progress = progress or Progress()
    report = BenchReport(name, list(batch_sizes), repeats)
    with tempfile.TemporaryDirectory() as tmp:
        progress.start("Preparing variants (fold, floor, two ONNX exports)")
        folded = fold(module, example_inputs).module
        floor = bn_free_floor(module, example_inputs)
        plain_path, ours_path = Path(tmp) / "plain.onnx", Path(tmp) / "bnfold.onnx"
        inputs = with_batch(example_inputs, CAPTURE_BATCH)
        # torch's default export (its optimizer folds the simple Conv/Gemm + BN pairs) of the
        # unfolded captured graph: what torch.onnx.export traces itself, and TorchScript works too.
        unfolded = capture(module, example_inputs).module()
        with quiet_torch():
            torch.onnx.export(
                unfolded,
                inputs,
                str(plain_path),
                dynamo=True,
                verbose=False,
                dynamic_shapes=batch_dynamic_shapes(unfolded, inputs),
            )
        ir.save(
            to_onnx(folded, example_inputs, outputs=output_count(folded), dynamic_batch=True, opset=None), ours_path
        )
        sessions = {
            ORT_PLAIN: _session(plain_path, True),
            ORT_PLAIN_NOOPT: _session(plain_path, False),
            ORT_BNFOLD: _session(ours_path, True),
            ORT_BNFOLD_NOOPT: _session(ours_path, False),
        }
        if calibration is not None:
            int8_path = Path(tmp) / "int8.onnx"
            quantize_unchecked(ours_path, int8_path, calibration, Path(tmp) / "calibration.json")
            sessions[ORT_INT8] = _session(int8_path, True)
            report.file_bytes = {FILE_FP32: ours_path.stat().st_size, FILE_INT8: int8_path.stat().st_size}
        report.session_creation_ms = {
            "plain export": _creation_ms(plain_path, True),
            "bnfold": _creation_ms(ours_path, True),
            "bnfold, opts disabled": _creation_ms(ours_path, False),
        }
        progress.finish()
        for batch in batch_sizes:
            progress.start(f"Timing batch {batch}")
            xs = with_batch(example_inputs, batch)
            runners = _runners(module, folded, floor, sessions, xs)
            for run in runners.values():
                for _ in range(warmup):
                    run()
            samples: dict[str, list[float]] = {v: [] for v in runners}
            order = list(runners)
            for i in range(repeats):
                for variant in order[i % len(order) :] + order[: i % len(order)]:  # rotate the order
                    t0 = time.perf_counter()
                    runners[variant]()
                    samples[variant].append((time.perf_counter() - t0) * 1e3)
                progress.advance(i + 1, repeats)
            for variant, times in samples.items():
                report.median_ms.setdefault(variant, {})[batch] = statistics.median(times)
            progress.finish()
    return report


def quantize_unchecked(fp32_path: Path, int8_path: Path, calibration: ArraysArg, cache: Path) -> None:
    """Quantize ``fp32_path`` into ``int8_path`` as :func:`bnfold.export` does before its check:
    the same calibration samples of ``calibration``, every layer ONNX Runtime supports quantized."""
    from .quantization.calibration import BatchReader, split_data  # ONNX Runtime's quantization tool
    from .quantization.layers import weight_layers
    from .quantization.quantize import quantize

    specs = Predictor(fp32_path, device="cpu", optimize=False).inputs
    data = split_data(calibration, specs, None, None)
    unsupported = [layer.node for layer in weight_layers(onnx.load(str(fp32_path))) if layer.unsupported]
    reader = BatchReader(data.calibration, None)
    quantize(fp32_path, int8_path, reader=reader, method=CALIBRATION_METHODS[0], exclude=unsupported, cache=cache)


def _runners(
    module: nn.Module,
    folded: nn.Module,
    floor: nn.Module,
    sessions: dict[str, ort.InferenceSession],
    xs: tuple[torch.Tensor, ...],
) -> dict[str, Callable[[], Any]]:
    def ort_feeds(session: ort.InferenceSession) -> dict[str, np.ndarray]:
        return {i.name: x.numpy() for i, x in zip(session.get_inputs(), xs)}

    feeds = {k: ort_feeds(s) for k, s in sessions.items()}
    return {
        EAGER_ORIGINAL: lambda: run_eval(module, xs),
        EAGER_FOLDED: lambda: run_eval(folded, xs),
        EAGER_FLOOR: lambda: run_eval(floor, xs),
        **{k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sessions.items()},
    }
