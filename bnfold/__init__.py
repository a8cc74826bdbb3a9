"""bnfold: fold batch-norm into a trained PyTorch CNN, export it to ONNX and verify it.

Public API: :func:`load_model`, :func:`fold`, :func:`export`, :func:`verify`,
:func:`recalibrate`, :class:`Predictor`, the report classes and the :class:`BnfoldError` family.
Only the errors and :class:`Predictor` are imported with the package; the rest on first use.
"""

__version__ = "0.1.0"

import importlib
from typing import Any

from .errors import (
    BnfoldError,
    ExportError,
    FoldError,
    ModelLoadError,
    OutputError,
    Param,
    UnsafeModelError,
    UsageError,
    VerificationError,
)
from .predictor import CudaUnavailableWarning, FilePredictions, Predictor, predict_files

# Names imported on first use, by the module that defines them: these modules import torch and
# onnxscript (seconds), which running an exported model (Predictor, bnfold.on_ray's actors) needs not.
_LAZY = {
    "DEFAULT_ATOL": "defaults",
    "DEFAULT_RTOL": "defaults",
    "BatchNormEntry": "report",
    "ExportOptions": "export_options",
    "ExportResult": "report",
    "FoldReport": "report",
    "FoldResult": "folding",
    "Int8Layer": "report",
    "Int8Output": "report",
    "Int8Report": "report",
    "LoadedModel": "loading",
    "OutputCheck": "report",
    "RecalibratedLayer": "report",
    "RecalibrationReport": "report",
    "VerifyReport": "report",
    "export": "exporting",
    "fold": "folding",
    "load_model": "loading",
    "parse_shape": "shapes",
    "recalibrate": "recalibration",
    "verify": "verification",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "BatchNormEntry",
    "BnfoldError",
    "CudaUnavailableWarning",
    "ExportError",
    "ExportOptions",
    "ExportResult",
    "FilePredictions",
    "FoldError",
    "FoldReport",
    "FoldResult",
    "Int8Layer",
    "Int8Output",
    "Int8Report",
    "LoadedModel",
    "ModelLoadError",
    "OutputCheck",
    "OutputError",
    "Param",
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
    "predict_files",
    "recalibrate",
    "verify",
]
