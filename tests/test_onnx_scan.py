"""Reading initializer types from the wire format: the same answer as onnx.load, without loading
the tensors, and a ValueError (never a crash or a hang) on damaged files."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from helpers import random_input, randomize_batchnorms
from torch import nn

import bnfold
from bnfold.onnx_scan import initializer_data_types
from bnfold.protobuf_wire import (
    DATA_TYPE_FIELD,
    END_GROUP,
    GRAPH_FIELD,
    INITIALIZER_FIELD,
    START_GROUP,
    VARINT,
    encode_varint,
    field_header,
    tag,
)


def loaded_types(path) -> set[int]:
    return {t.data_type for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("fp16", [False, True], ids=["float32", "float16"])
def test_the_types_match_onnx_load(tmp_path, fp16):
    model = randomize_batchnorms(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    )
    path = bnfold.export(model, (random_input(1, 3, 8, 8),), tmp_path / "m.onnx", fp16=fp16, verify=False).path
    types = initializer_data_types(path)
    assert types == loaded_types(path)
    assert (onnx.TensorProto.FLOAT16 in types) == fp16


def test_merged_graph_fields_and_several_types(tmp_path):
    """A graph split over several ``graph`` fields (valid protobuf: they merge) is read whole."""
    first, second = onnx.ModelProto(), onnx.ModelProto()
    first.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(3, np.float32), "a"))
    second.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(3, np.int64), "b"))
    second.graph.node.add(op_type="Identity", input=["a"], output=["c"])
    path = tmp_path / "m.onnx"
    path.write_bytes(first.SerializeToString() + second.SerializeToString())
    assert initializer_data_types(path) == loaded_types(path) == {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}


def test_memory_does_not_grow_with_the_tensors(tmp_path):
    proto = onnx.ModelProto()
    for i in range(8):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(1 << 20, np.float32), f"w{i}"))
    path = tmp_path / "big.onnx"
    path.write_bytes(proto.SerializeToString())  # 32 MiB
    tracemalloc.start()
    try:
        assert initializer_data_types(path) == {onnx.TensorProto.FLOAT}
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


@pytest.mark.parametrize("damage", ["truncated", "garbage", "overlong length"])
def test_damaged_files_are_a_value_error(tmp_path, damage):
    proto = onnx.ModelProto()
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(64, np.float32), "w"))
    data = proto.SerializeToString()
    data = {
        "truncated": data[: len(data) // 2],
        "garbage": b"\xff" * 64,
        "overlong length": b"\x3a\xff\xff\xff\x0f" + data,
    }[damage]
    path = tmp_path / "bad.onnx"
    path.write_bytes(data)
    with pytest.raises(ValueError):
        initializer_data_types(path)


def _model_with_tensor_bytes(tensor: bytes) -> bytes:
    """A ModelProto whose graph holds one initializer given as raw TensorProto bytes."""
    graph = field_header(INITIALIZER_FIELD, len(tensor)) + tensor
    return field_header(GRAPH_FIELD, len(graph)) + graph


@pytest.mark.parametrize(
    "case",
    ["group before the graph", "data_type given twice", "data_type over 32 bits"],
)
def test_unusual_but_valid_encodings_read_as_protobuf_reads_them(tmp_path, case):
    half = onnx.numpy_helper.from_array(np.ones(4, np.float16), "w").SerializeToString()
    group = tag(99, START_GROUP) + tag(1, VARINT) + encode_varint(5) + tag(99, END_GROUP)  # field 99: a group
    data = {
        "group before the graph": group + _model_with_tensor_bytes(half),
        "data_type given twice": _model_with_tensor_bytes(
            half + tag(DATA_TYPE_FIELD, VARINT) + encode_varint(onnx.TensorProto.FLOAT)
        ),  # float16, then float
        "data_type over 32 bits": _model_with_tensor_bytes(
            half + tag(DATA_TYPE_FIELD, VARINT) + encode_varint(onnx.TensorProto.FLOAT16 + (1 << 32))
        ),
    }[case]
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    assert initializer_data_types(path) == loaded_types(path)
