"""Defaults of verification, recalibration and INT8 export, and the check of verification's
settings, apart from :mod:`bnfold.verification` and :mod:`bnfold.recalibration` so that the CLI
and :class:`bnfold.ExportOptions` can use them without importing torch."""

from __future__ import annotations

from .errors import Param, UsageError

# Defaults, justified in the README ("Verification tolerances"): fp32 re-association error of a
# folded network is ~1e-6 of the output scale; a wrong fold (dropped eps, one mis-scaled channel)
# is far above 1e-4.
DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5
# float16 models (exported with `fp16=True`, or float16 weights): a float16 ulp is 1e-3 relative, and activations are rounded at every
# layer; the sample models measure 0.4e-3 to 0.8e-3 normwise (README, "float16").
FP16_RTOL = 1e-2
FP16_ATOL = 1e-3
# What verification compares the ONNX model with: the float32 original, or a float64 copy of it.
REFERENCES = ("float32", "float64")
# Samples per forward pass when recalibrating batch-norm statistics.
RECALIBRATION_BATCH_SIZE = 64
# INT8 export (`int8=True`): ONNX Runtime's calibration methods by bnfold's name, the first the
# default; the accuracy budget, justified in the README ("INT8") by docs/performance.md's
# measurements; and how many layers the budget may leave in float.
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
INT8_MIN_AGREEMENT = 0.99
INT8_MIN_SQNR_DB = 20.0
INT8_MAX_FLOAT_LAYERS = 3


def check_verification_settings(rtol: float | None, atol: float | None, reference: str) -> None:
    """A :class:`~bnfold.errors.UsageError` naming the setting unless ``rtol``/``atol`` are unset
    or non-negative (NaN is not) and ``reference`` is one of :data:`REFERENCES`."""
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not value >= 0:
            raise UsageError(Param(name), f" must be non-negative (got {value})")
    if reference not in REFERENCES:
        raise UsageError(Param("reference"), f" {reference!r}: expected one of {', '.join(REFERENCES)}")
