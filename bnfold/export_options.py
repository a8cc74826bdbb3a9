"""What :func:`bnfold.export` does besides folding: one frozen record of every export option.

The library and the CLI share it: ``bnfold export``'s option groups build one (see
``bnfold.cli.options``), and a Python caller passes one, or its fields as keywords. Adding an
option means a field here and a flag in its option group; errors about a field name it with
:class:`~bnfold.errors.Param`, which the CLI writes as the flag.

Imports neither torch nor ONNX, so the CLI can build options before loading a model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields

from .arrays import ArraysArg
from .defaults import (
    CALIBRATION_METHODS,
    INT8_MAX_FLOAT_LAYERS,
    INT8_MIN_AGREEMENT,
    INT8_MIN_SQNR_DB,
    check_verification_settings,
)
from .errors import Param, UsageError
from .metadata import Preprocess


@dataclass(frozen=True)
class ExportOptions:
    """How :func:`bnfold.export` exports, verifies and describes a folded model.

    Every field has the default ``bnfold export`` uses; the values are checked when the record
    is made (a :class:`~bnfold.errors.UsageError` naming the field).
    """

    dynamic_batch: bool = True
    """Export a symbolic batch axis (dim 0 of every input); ``False`` fixes the example's batch."""
    dynamic_size: bool = False
    """Export symbolic heights and widths for every image-like input (``NxCxHxW``), with the
    constraints the model has (a smallest size, a multiple of its total stride), stated in the
    report and the ONNX metadata; verification runs at three sizes. ``False`` fixes the example's."""
    opset: int | None = None
    """ONNX opset; ``None`` takes the exporter's default. An opset it cannot reach is an error."""
    verify: bool = True
    """Run the ONNX model in ONNX Runtime against the eval-mode PyTorch model before writing it."""
    rtol: float | None = None
    """Relative tolerance of verification, against ``max|y_ref|``; ``None``: the float32 default,
    or the float16 one for ``fp16`` and float16/bfloat16 models (see :mod:`bnfold.defaults`)."""
    atol: float | None = None
    """Absolute tolerance of verification; ``None`` as for ``rtol``."""
    inputs: ArraysArg | None = None
    """Verification data (``.npy``/``.npz`` path, array, or arrays by input name); ``None``:
    seeded random inputs of the example's shapes."""
    reference: str = "float32"
    """What verification compares with: the float32 original, or a float64 copy of it
    (``"float64"``, which also reports each side's error against float64)."""
    fp16: bool = False
    """Export float16 weights and activations (folded in float64 first, range-checked)."""
    keep_io_types: bool = False
    """With ``fp16``: keep float32 inputs and outputs."""
    labels: tuple[str, ...] | None = None
    """Class labels, one per class of the first output, stored in the ONNX metadata."""
    preprocess: Preprocess | None = None
    """Image preprocessing stored in the ONNX metadata, for :class:`bnfold.Predictor`."""
    rules: tuple[str, ...] | None = None
    """Apply only these fold rules (by name); ``None``: all (see :func:`bnfold.fold`)."""
    skip_rules: tuple[str, ...] | None = None
    """Apply every fold rule except these."""
    int8: bool = False
    """After the float32 export passed verification, quantize it to INT8 with ONNX Runtime's
    static quantization (QDQ, per-channel int8 weights, uint8 activations calibrated on
    ``calibration``), check it against the PyTorch model on data held apart from calibration,
    and write it only if it meets the accuracy budget (see :mod:`bnfold.quantization`)."""
    calibration: ArraysArg | None = None
    """With ``int8``: the data (``.npy``/``.npz`` path, array, arrays by input name, or a folder
    of images read with ``preprocess``), split into calibration samples and held-out samples."""
    calibration_method: str = CALIBRATION_METHODS[0]
    """With ``int8``: how activation ranges are calibrated: ``minmax``, ``entropy`` or ``percentile``."""
    calibration_samples: int | None = None
    """With ``int8``: samples that calibrate (the rest verify); ``None``: half the data, at most 256."""
    int8_min_agreement: float = INT8_MIN_AGREEMENT
    """With ``int8``: the least top-1 agreement with the PyTorch model, per classifier output."""
    int8_min_sqnr: float = INT8_MIN_SQNR_DB
    """With ``int8``: the least signal-to-quantization-noise ratio (dB) of every output."""
    int8_max_float_layers: int = INT8_MAX_FLOAT_LAYERS
    """With ``int8``: how many of the most sensitive layers the budget may leave in float (0: none)."""

    def __post_init__(self) -> None:
        for name in ("labels", "rules", "skip_rules"):  # any sequence in, a hashable tuple kept
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, _names(name, value))
        if self.keep_io_types and not self.fp16:
            raise UsageError(Param("keep_io_types", True), " only applies with ", Param("fp16", True))
        check_verification_settings(self.rtol, self.atol, self.reference)
        if self.rules is not None or self.skip_rules is not None:
            from .folding.rules import select  # imports torch: only when rules are chosen

            select(self.rules, self.skip_rules)  # unknown names are an error now, not after loading
        if self.preprocess is not None and self.preprocess.size is None and not self.dynamic_size:
            raise UsageError(
                Param("preprocess.size"), " dynamic (each image at its own size) needs ", Param("dynamic_size", True)
            )
        if self.opset is not None and self.opset < 1:
            raise UsageError(Param("opset"), f" must be a positive opset version (got {self.opset})")
        self._check_int8()

    def _check_int8(self) -> None:
        if not self.int8:
            given = [f.name for f in fields(self) if f.name in INT8_ONLY and _given(getattr(self, f.name), f.default)]
            if given:
                raise UsageError(Param(given[0]), " only applies with ", Param("int8", True))
            return
        if self.fp16:
            raise UsageError(
                Param("int8", True),
                " and ",
                Param("fp16", True),
                " exclude each other: INT8 quantizes the float32 model",
            )
        if self.dynamic_size:
            raise UsageError(
                Param("int8", True),
                " does not take ",
                Param("dynamic_size", True),
                " (yet): its accuracy is measured at the calibration data's size only",
            )
        if not self.verify:
            raise UsageError(
                Param("verify", False),
                " cannot be used with ",
                Param("int8", True),
                ": an INT8 model is written only after its accuracy check",
            )
        if self.calibration is None:
            raise UsageError(
                Param("int8", True),
                " needs ",
                Param("calibration"),
                ": data (.npy/.npz or an image folder) to calibrate activation ranges on",
            )
        if isinstance(self.calibration, (str, os.PathLike)) and not os.path.exists(self.calibration):
            raise UsageError(Param("calibration"), f" {self.calibration}: no such file or folder")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise UsageError(
                Param("calibration_method"),
                f" {self.calibration_method!r}: expected one of {', '.join(CALIBRATION_METHODS)}",
            )
        if self.calibration_samples is not None and self.calibration_samples < 1:
            raise UsageError(Param("calibration_samples"), f" must be at least 1 (got {self.calibration_samples})")
        if not 0 <= self.int8_min_agreement <= 1:  # NaN fails too
            raise UsageError(
                Param("int8_min_agreement"), f" must be a fraction from 0 to 1 (got {self.int8_min_agreement})"
            )
        if not math.isfinite(self.int8_min_sqnr):
            raise UsageError(Param("int8_min_sqnr"), f" must be a finite number of dB (got {self.int8_min_sqnr})")
        if self.int8_max_float_layers < 0:
            raise UsageError(Param("int8_max_float_layers"), f" must be 0 or more (got {self.int8_max_float_layers})")


# The fields that only mean something with ``int8=True``.
INT8_ONLY = (
    "calibration",
    "calibration_method",
    "calibration_samples",
    "int8_min_agreement",
    "int8_min_sqnr",
    "int8_max_float_layers",
)


def _given(value: object, default: object) -> bool:
    """Whether a field holds something else than its default (an array counts as given)."""
    return value is not default and (default is None or value != default)


def _names(field: str, value: Sequence[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        raise UsageError(Param(field), f" {value!r}: expected a sequence of names, not one string")
    return tuple(value)
