"""bnfold: fold batch-norm into a trained PyTorch CNN, export it to ONNX and verify it.

Public API: :func:`load_model`, :func:`fold`, :func:`export`, :func:`verify`,
:func:`recalibrate`, :class:`Predictor`, the report classes and the :class:`BnfoldError` family.
"""

__version__ = "0.1.0"

from .errors import (
    BnfoldError,
    ExportError,
    FoldError,
    ModelLoadError,
    OutputError,
    UnsafeModelError,
    UsageError,
    VerificationError,
)
from .export import export
from .fold import FoldResult, fold
from .loading import LoadedModel, load_model, parse_shape
from .predictor import CudaUnavailableWarning, Predictor
from .recalibrate import recalibrate
from .report import (
    BatchNormEntry,
    ExportResult,
    FoldReport,
    OutputCheck,
    RecalibratedLayer,
    RecalibrationReport,
    VerifyReport,
)
from .verify import DEFAULT_ATOL, DEFAULT_RTOL, verify

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "BatchNormEntry",
    "BnfoldError",
    "CudaUnavailableWarning",
    "ExportError",
    "ExportResult",
    "FoldError",
    "FoldReport",
    "FoldResult",
    "LoadedModel",
    "ModelLoadError",
    "OutputCheck",
    "OutputError",
    "Predictor",
    "RecalibratedLayer",
    "RecalibrationReport",
    "UnsafeModelError",
    "UsageError",
    "VerificationError",
    "VerifyReport",
    "__version__",
    "export",
    "fold",
    "load_model",
    "parse_shape",
    "recalibrate",
    "verify",
]
