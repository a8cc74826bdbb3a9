"""bnfold: fold batch-norm into a trained PyTorch CNN, export it to ONNX and verify it.

Public API: :func:`load_model`, :func:`fold`, :func:`export`, :func:`verify`,
:func:`recalibrate`, :class:`Predictor`, the report classes and the :class:`BnfoldError` family.
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    BnfoldError,
    ExportError,
    FoldError,
    ModelLoadError,
    OutputError,
    UnsafeModelError,
    UsageError,
    VerificationError,
)
from .export import export  # noqa: E402
from .fold import FoldResult, fold  # noqa: E402
from .loading import LoadedModel, load_model, parse_shape  # noqa: E402
from .predictor import CudaUnavailableWarning, Predictor  # noqa: E402
from .recalibrate import recalibrate  # noqa: E402
from .report import (  # noqa: E402
    BatchNormEntry,
    ExportResult,
    FoldReport,
    OutputCheck,
    RecalibratedLayer,
    RecalibrationReport,
    VerifyReport,
)
from .verify import DEFAULT_ATOL, DEFAULT_RTOL, verify  # noqa: E402

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
