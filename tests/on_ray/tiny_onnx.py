"""Tiny ONNX models built in a few milliseconds (no torch export) for the serving tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.metadata import Preprocess, metadata_props


def _save(graph: onnx.GraphProto, path: Path, props: dict[str, str]) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, props)
    onnx.save(model, str(path))
    return path


def image_classifier(path: Path, *, labels: list[str] | None = None, preprocess: bool = True) -> Path:
    """``x`` [N, 1, 2, 2] -> ``scores`` [N, 3] (a fixed linear map), with labels and grayscale
    2x2 preprocessing (mean 0.5, std 0.25) stored when asked."""
    weights = np.arange(12, dtype=np.float32).reshape(4, 3) / 10 - 0.5
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["flat"]),
            helper.make_node("MatMul", ["flat", "W"], ["scores"]),
        ],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 2, 2])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(weights, "W")],
    )
    steps = Preprocess(size=(2, 2), mean=(0.5,), std=(0.25,), channel_order="L") if preprocess else None
    return _save(graph, path, metadata_props(labels, steps))


def two_in_two_out(path: Path) -> Path:
    """``a``, ``b`` [N, 3] -> ``total`` = a + b, ``product`` = a * b."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["total"]), helper.make_node("Mul", ["a", "b"], ["product"])],
        "pair",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in ("a", "b")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in ("total", "product")],
    )
    return _save(graph, path, {})
