"""bnfold: fold batch-norm into a trained PyTorch CNN, export it to ONNX and verify it.

Public API: :func:`load_model`, :func:`fold`, :func:`export`, :func:`verify`,
:func:`recalibrate`, :class:`Predictor`, the report classes and the :class:`BnfoldError` family.
Only the errors and :class:`Predictor` are imported with the package; the rest on first use.
"""

__version__ = "0.1.0"

import importlib
import sys
import types
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
from .predictor import CudaUnavailableWarning, Predictor

# Names imported on first use, by the module that defines them: these modules import torch and
# onnxscript (seconds), which running an exported model (Predictor, bnfold.scale's actors) needs not.
_LAZY = {
    "DEFAULT_ATOL": "verify",
    "DEFAULT_RTOL": "verify",
    "BatchNormEntry": "report",
    "ExportOptions": "export_options",
    "ExportResult": "report",
    "FoldReport": "report",
    "FoldResult": "fold",
    "LoadedModel": "loading",
    "OutputCheck": "report",
    "RecalibratedLayer": "report",
    "RecalibrationReport": "report",
    "VerifyReport": "report",
    "export": "export",
    "fold": "fold",
    "load_model": "loading",
    "parse_shape": "shapes",
    "recalibrate": "recalibrate",
    "verify": "verify",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


class _Package(types.ModuleType):
    """``bnfold`` itself. Importing a submodule sets the package attribute of its name to the
    module; for the functions named like their module (``export``, ``fold``, ``verify``,
    ``recalibrate``) the attribute is the function instead, as with eager imports."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # Pickled by name, as modules are (cloudpickle, which Ray uses, knows only ModuleType itself).
        return importlib.import_module, (self.__name__,)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "BatchNormEntry",
    "BnfoldError",
    "CudaUnavailableWarning",
    "ExportError",
    "ExportOptions",
    "ExportResult",
    "FoldError",
    "FoldReport",
    "FoldResult",
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
    "recalibrate",
    "verify",
]
