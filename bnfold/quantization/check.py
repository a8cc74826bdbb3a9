"""The INT8 check: ONNX Runtime on a quantized file against the eval-mode PyTorch float32 model,
on data held apart from calibration.

The quantized model runs as it will be deployed: CPU, ONNX Runtime's graph optimizations on, so
its QDQ nodes are fused into integer kernels (their rounding and saturation are what is
measured). The float32 export before it was verified with optimizations off, as always.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from ..arrays import ArraysArg
from ..predictor import Predictor, TensorSpec
from ..reference import DATA_CHUNK, load_inputs, reference_outputs
from ..report import Int8Output, Int8Report
from ..user_module import module_device
from .metrics import OutputError


def pytorch_outputs(module: nn.Module, arrays: dict[str, np.ndarray], specs: list[TensorSpec]) -> list[np.ndarray]:
    """The float32 eval-mode outputs of ``module`` on ``arrays`` (by input name), run
    :data:`DATA_CHUNK` samples at a time."""
    device = module_device(module)
    samples = len(next(iter(arrays.values())))
    parts = []
    for start in range(0, samples, DATA_CHUNK):
        tensors = [
            torch.from_numpy(np.ascontiguousarray(arrays[s.name][start : start + DATA_CHUNK], dtype=np.float32)).to(
                device
            )
            for s in specs
        ]
        parts.append([t.detach().cpu().numpy() for t in reference_outputs(module, tensors)])
    return [np.concatenate([part[i] for part in parts]) for i in range(len(parts[0]))]


def deployed_predictor(path: str | os.PathLike[str]) -> Predictor:
    """The quantized model as it will run: CPU, graph optimizations on (QDQ fused into integer
    kernels), no spin-waiting (PyTorch runs on the same cores between calls)."""
    return Predictor(path, device="cpu", optimize=True, spin_wait=False, batch_size=DATA_CHUNK)


def measure(predictor: Predictor, arrays: dict[str, np.ndarray], reference: list[np.ndarray]) -> list[OutputError]:
    """Each output's distance between ``predictor``'s model (see :func:`deployed_predictor`) on
    ``arrays`` and ``reference``."""
    got = predictor.run({s.name: predictor.check_input(s, arrays[s.name]) for s in predictor.inputs})
    errors = [OutputError(spec.name) for spec in predictor.outputs]
    if len(got) != len(reference):
        for error in errors:
            error.problem = f"the INT8 model has {len(got)} output(s), the PyTorch model {len(reference)}"
        return errors
    for error, ref, out in zip(errors, reference, got):
        error.add(ref, out)
    return errors


def judge(errors: list[OutputError], min_agreement: float, min_sqnr_db: float) -> list[Int8Output]:
    """The report lines of every output (see :meth:`OutputError.judge`)."""
    return [error.judge(min_agreement, min_sqnr_db) for error in errors]


def lowest_sqnr(errors: list[OutputError]) -> float:
    """The lowest SQNR (dB) of any output: one number to rank quantization choices by."""
    return min(-np.inf if e.problem else e.sqnr_db for e in errors)


def verify_int8(module: nn.Module, path: str | os.PathLike[str], inputs: ArraysArg, facts: dict) -> Int8Report:
    """``bnfold verify`` of an INT8 model: the INT8 check on every sample of ``inputs``, against
    the budget the export stored in the metadata (``facts``, see :meth:`Int8Report.summary`).
    The samples should be held apart from the calibration samples, which it cannot tell."""
    predictor = deployed_predictor(path)
    arrays = load_inputs(inputs, predictor.inputs)
    reference = pytorch_outputs(module, arrays, predictor.inputs)
    errors = measure(predictor, arrays, reference)
    return Int8Report(
        calibration_method=facts["calibration_method"],
        calibration_samples=facts["calibration_samples"],
        verification_samples=len(next(iter(arrays.values()))),
        data_source=str(inputs) if isinstance(inputs, (str, os.PathLike)) else "given arrays",
        split="every sample given; keep the calibration samples out",
        min_agreement=facts["min_agreement"],
        min_sqnr_db=facts["min_sqnr_db"],
        max_float_layers=facts["max_float_layers"],
        outputs=judge(errors, facts["min_agreement"], facts["min_sqnr_db"]),
    )
