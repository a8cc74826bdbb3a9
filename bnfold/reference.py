"""The data a model is checked on and the original model's outputs on it: shared by
verification (:mod:`bnfold.verification`) and the INT8 check (:mod:`bnfold.quantization`)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .arrays import ArraysArg, read_arrays, select_inputs
from .errors import BnfoldError, Param, UsageError, label_parts
from .predictor import TensorSpec
from .user_module import model_failures, run_eval

# Samples per forward pass when a model is checked on data.
DATA_CHUNK = 64

InputsArg = ArraysArg | None


def load_inputs(source: InputsArg, specs: Sequence[TensorSpec], parameter: str = "inputs") -> dict[str, np.ndarray]:
    """Arrays for every model input (see :func:`bnfold.arrays.select_inputs`), shape-checked;
    errors name ``parameter``, the library parameter ``source`` was given as."""
    label = (Param(parameter), f" {source}") if isinstance(source, (str, os.PathLike)) else Param(parameter)
    arrays = select_inputs(read_arrays(source, Param(parameter)), [s.name for s in specs], label)
    for spec, arr in zip(specs, arrays):
        if arr.ndim != len(spec.shape) or any(
            isinstance(w, int) and w != g for w, g in zip(spec.shape[1:], arr.shape[1:])
        ):
            raise UsageError(
                *label_parts(label),
                f": array for input '{spec.name}' has shape {arr.shape}; the model takes {spec.shape}",
            )
    return {spec.name: arr for spec, arr in zip(specs, arrays)}


def reference_outputs(module: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The module's outputs on ``inputs``; a model that fails on them is the user's to fix."""
    with model_failures(
        inputs,
        BnfoldError,
        "the PyTorch model fails on the verification input",
        "Is the ONNX file exported from this model?",
    ):
        return run_eval(module, inputs)
