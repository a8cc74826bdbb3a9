"""INT8 within an accuracy budget: quantize every weight layer, check the INT8 model against the
PyTorch model on held-out data, and when it misses the budget, leave the most sensitive layers in
float one at a time until it holds or the limit of float layers is reached.

A layer's sensitivity is measured on the calibration samples (never the held-out ones, which
judge the result): how many dB the lowest output SQNR gains when that layer alone is left in
float, each layer quantized again with ONNX Runtime's ``nodes_to_exclude`` and the activation
ranges of the first calibration.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from torch import nn

from ..errors import Param, UsageError
from ..export_options import ExportOptions
from ..predictor import Predictor, TensorSpec
from ..progress import Progress
from ..report import FLOAT, INT8, Int8Layer, Int8Output, Int8Report
from .calibration import BatchReader, SplitData, split_data
from .check import deployed_predictor, judge, lowest_sqnr, measure, pytorch_outputs
from .layers import WEIGHT_OPS, WeightLayer, weight_layers
from .quantize import quantize

# Calibration samples the sensitivity of each layer is measured on (the first of them).
SENSITIVITY_SAMPLES = 64


@dataclass
class _Attempt:
    """One quantization tried: the layers left in float, and the result on the data it was checked on."""

    excluded: list[str]
    outputs: list[Int8Output]
    lowest_sqnr_db: float

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)


@dataclass
class _Quantizer:
    """Quantizes one float32 model with some layers in float, and checks the result; the
    activation ranges are calibrated once and cached in ``cache``."""

    fp32_path: str | os.PathLike[str]
    data: SplitData
    static_batch: int | None
    options: ExportOptions
    cache: Path

    def attempt(
        self,
        excluded: dict[str, str | None],
        out: str | os.PathLike[str],
        arrays: dict[str, np.ndarray],
        reference: list[np.ndarray],
    ) -> _Attempt:
        """Quantize with the nodes ``excluded`` in float into ``out``, and check it on ``arrays``."""
        quantize(
            self.fp32_path,
            out,
            reader=BatchReader(self.data.calibration, self.static_batch),
            method=self.options.calibration_method,
            exclude=list(excluded),
            cache=self.cache,
        )
        errors = measure(deployed_predictor(out), arrays, reference)
        outputs = judge(errors, self.options.int8_min_agreement, self.options.int8_min_sqnr)
        return _Attempt(list(excluded), outputs, lowest_sqnr(errors))


def quantize_within_budget(
    module: nn.Module,
    fp32_path: str | os.PathLike[str],
    int8_path: str | os.PathLike[str],
    options: ExportOptions,
    progress: Progress,
) -> Int8Report:
    """Quantize the verified float32 model at ``fp32_path`` into ``int8_path`` as ``options``
    say (``calibration``, ``calibration_method``, ``calibration_samples``, the ``int8_*``
    budget), and check it against ``module``. Returns the report; it does not raise when the
    budget is missed (the caller writes nothing then)."""
    layers = weight_layers(onnx.load(str(fp32_path), load_external_data=False))
    if not layers:
        raise UsageError(
            Param("int8", True),
            f": the model has no {', '.join(WEIGHT_OPS)} with a stored weight, so there is nothing to "
            "quantize; export it in float32",
        )
    specs = Predictor(fp32_path, device="cpu", optimize=False).inputs
    static_batch = next((s.shape[0] for s in specs if not s.batch_is_dynamic), None)
    data = split_data(options.calibration, specs, options.preprocess, options.calibration_samples)
    progress.start("INT8: running PyTorch on the held-out samples")
    reference = pytorch_outputs(module, data.held_out, specs)
    progress.finish()
    reasons = {layer.node: layer.unsupported for layer in layers if layer.unsupported}
    with tempfile.TemporaryDirectory(prefix="bnfold-int8-") as tmp:
        quantizer = _Quantizer(fp32_path, data, static_batch, options, Path(tmp) / "calibration.json")
        progress.start(f"INT8: calibrating ({options.calibration_method}) and quantizing")
        tried = [quantizer.attempt(reasons, int8_path, data.held_out, reference)]
        progress.finish()
        sensitivity: dict[str, float] = {}
        if not tried[-1].passed and options.int8_max_float_layers > 0:
            sensitivity = _sensitivities(quantizer, layers, reasons, module, specs, Path(tmp) / "probe.onnx", progress)
            ranked = sorted(((gain, node) for node, gain in sensitivity.items() if gain > 0), reverse=True)
            for rank, (gain, node) in enumerate(ranked[: options.int8_max_float_layers], start=1):
                reasons[node] = (
                    f"accuracy budget: the lowest output SQNR gains {gain:+.1f} dB when it alone is float "
                    f"(most sensitive #{rank})"
                )
                progress.start(f"INT8: quantizing again with {rank} sensitive layer(s) in float")
                tried.append(quantizer.attempt(reasons, int8_path, data.held_out, reference))
                progress.finish()
                if tried[-1].passed:
                    break
    return _report(options, data, layers, reasons, sensitivity, tried, fp32_path, int8_path)


def _sensitivities(
    quantizer: _Quantizer,
    layers: list[WeightLayer],
    reasons: dict[str, str | None],
    module: nn.Module,
    specs: list[TensorSpec],
    probe: Path,
    progress: Progress,
) -> dict[str, float]:
    """For each quantized layer, the dB the lowest output SQNR gains on the first
    :data:`SENSITIVITY_SAMPLES` calibration samples when it alone is left in float."""
    arrays = {name: a[:SENSITIVITY_SAMPLES] for name, a in quantizer.data.calibration.items()}
    reference = pytorch_outputs(module, arrays, specs)
    candidates = [layer.node for layer in layers if layer.node not in reasons]
    progress.start("INT8: measuring each layer's sensitivity")
    base = quantizer.attempt(reasons, probe, arrays, reference).lowest_sqnr_db
    gains = {}
    for i, node in enumerate(candidates):
        gains[node] = quantizer.attempt({**reasons, node: None}, probe, arrays, reference).lowest_sqnr_db - base
        progress.advance(i + 1, len(candidates))
    progress.finish()
    return gains


def _report(
    options: ExportOptions,
    data: SplitData,
    layers: list[WeightLayer],
    reasons: dict[str, str | None],
    sensitivity: dict[str, float],
    tried: list[_Attempt],
    fp32_path: str | os.PathLike[str],
    int8_path: str | os.PathLike[str],
) -> Int8Report:
    names = {layer.node: layer.name for layer in layers}
    attempts = [
        f"{', '.join(names[n] for n in t.excluded) or 'no layer'} in float: lowest SQNR {t.lowest_sqnr_db:.1f} dB, "
        + ("pass" if t.passed else "fail")
        for t in tried
    ]
    return Int8Report(
        calibration_method=options.calibration_method,
        calibration_samples=data.calibration_samples,
        verification_samples=data.held_out_samples,
        data_source=data.source,
        split=data.split,
        min_agreement=options.int8_min_agreement,
        min_sqnr_db=options.int8_min_sqnr,
        max_float_layers=options.int8_max_float_layers,
        outputs=tried[-1].outputs,
        layers=[
            Int8Layer(
                name=layer.name,
                node=layer.node,
                op_type=layer.op_type,
                status=FLOAT if layer.node in reasons else INT8,
                reason=reasons.get(layer.node),
                sensitivity_db=sensitivity.get(layer.node),
            )
            for layer in layers
        ],
        attempts=attempts,
        fp32_bytes=_file_bytes(fp32_path),
        int8_bytes=_file_bytes(int8_path),
    )


def _file_bytes(path: str | os.PathLike[str]) -> int:
    """The size of an ONNX file and of its external data, if any (``<name>.data`` beside it)."""
    file = Path(path)
    data = file.with_name(file.name + ".data")
    return file.stat().st_size + (data.stat().st_size if data.exists() else 0)
