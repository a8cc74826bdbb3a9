"""Run an ONNX model in ONNX Runtime: CUDA when it really works, CPU otherwise (said out loud),
with input checks and batching. Verification runs ONNX models through :class:`Predictor` too.

``session`` chooses and creates the ONNX Runtime session (providers, CUDA probing, options);
``runner`` runs it (validation, batching); ``binding`` binds torch CUDA tensors in place;
``specs`` describes the model's inputs and outputs; ``topk`` reads a classifier's scores.
"""

from .runner import Predictor
from .session import CPU, CUDA, CUDA_OPTIONS, DEVICES, CudaUnavailableWarning, session_options
from .specs import TensorSpec
from .topk import check_top_k, class_label, top_k

__all__ = [
    "CPU",
    "CUDA",
    "CUDA_OPTIONS",
    "DEVICES",
    "CudaUnavailableWarning",
    "Predictor",
    "TensorSpec",
    "check_top_k",
    "class_label",
    "session_options",
    "top_k",
]
