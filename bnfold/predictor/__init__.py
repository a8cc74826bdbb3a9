"""Run an ONNX model in ONNX Runtime: CUDA when it really works, CPU otherwise (said out loud),
with input checks and batching. Verification runs ONNX models through :class:`Predictor` too.

``session`` chooses and creates the ONNX Runtime session (providers, CUDA probing, options);
``runner`` runs it (validation, batching); ``binding`` binds torch CUDA tensors in place;
``specs`` describes the model's inputs and outputs; ``topk`` reads a classifier's scores;
``files`` predicts over image and array files and folders; ``summary`` describes a model.
"""

from .files import FilePredictions, predict_files
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
    "FilePredictions",
    "Predictor",
    "TensorSpec",
    "check_top_k",
    "class_label",
    "predict_files",
    "session_options",
    "top_k",
]
