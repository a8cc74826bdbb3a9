"""INT8 export: static quantization of the verified float32 model with ONNX Runtime's own tool,
checked against the PyTorch model on data held apart from calibration, within an accuracy budget
(see :func:`quantize_within_budget`).

Modules, one job each: ``calibration`` (the user's data, its split, the calibration reader),
``layers`` (the weight layers of the ONNX graph), ``quantize`` (ONNX Runtime's ``quantize_static``
with bnfold's settings), ``metrics`` (SQNR, max relative error, top-1 agreement), ``check`` (the
INT8 model against PyTorch), ``budget`` (the fallback that leaves sensitive layers in float).
"""

from .budget import quantize_within_budget

__all__ = ["quantize_within_budget"]
