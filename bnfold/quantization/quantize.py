"""Static INT8 quantization with ONNX Runtime's own tool: QDQ format, per-channel symmetric int8
weights, uint8 activations whose ranges are calibrated on the user's data. bnfold only chooses
the settings and the layers left in float; it does not quantize anything itself."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from ..errors import ExportError, first_line

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
# uint8 activations with int8 weights: ONNX Runtime's x86 kernels for this pair (u8s8) ran a
# folded ResNet-18 at 0.47x the float32 latency at batch 1, where int8 activations (s8s8) ran at
# 1.39x (`python benchmarks/int8.py --activations`, docs/performance.md). Activation ranges are
# asymmetric (a zero point), so a ReLU output uses all 256 levels either way.
ACTIVATION_TYPE = QuantType.QUInt8
WEIGHT_TYPE = QuantType.QInt8
# A ConvTranspose weight is [Cin, Cout/groups, k...]: its output channels are axis 1.
PER_CHANNEL_AXES = {"ConvTranspose": 1}


def quantize(
    fp32_path: str | os.PathLike[str],
    int8_path: str | os.PathLike[str],
    *,
    reader: CalibrationDataReader | None,
    method: str,
    exclude: Sequence[str],
    cache: Path,
) -> None:
    """Quantize the float32 ONNX model at ``fp32_path`` into ``int8_path``, leaving the nodes
    ``exclude`` in float.

    The activation ranges are calibrated by ONNX Runtime on ``reader``'s batches the first time
    and kept in ``cache`` (a JSON file ONNX Runtime writes), so that quantizing again with other
    nodes excluded reuses them (``reader`` may then be ``None``). Whatever ONNX Runtime raises
    is an :class:`ExportError`.
    """
    try:
        with _quiet_root_logger(), contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print
            quantize_static(
                str(fp32_path),
                str(int8_path),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=ACTIVATION_TYPE,
                weight_type=WEIGHT_TYPE,
                nodes_to_exclude=list(exclude),
                calibrate_method=METHODS[method],
                calibration_cache_path=cache,
                extra_options={"QDQOpTypePerChannelSupportToAxis": PER_CHANNEL_AXES},
            )
    except Exception as exc:  # onnxruntime.quantization raises ValueError, RuntimeError, its session's errors...
        raise ExportError(f"ONNX Runtime's INT8 quantization failed: {type(exc).__name__}: {first_line(exc)}") from exc


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ONNX Runtime's quantization tool logs advice through the root logger (which configures
    a stderr handler on first use): keep it off the user's terminal and the root logger as it was."""
    root = logging.getLogger()
    handler, level = logging.NullHandler(), root.level
    root.addHandler(handler)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
