"""The streamed ONNX writer: the file reads back as the whole model, the model is left as it
was, and only one tensor is serialized at a time."""

from __future__ import annotations

import io
import tracemalloc

import onnx
import pytest
import torch
from helpers import randomize_batchnorms
from onnxscript import ir
from torch import nn

from bnfold.exporting import to_onnx
from bnfold.onnx_ir import tensor_bytes
from bnfold.onnx_writer import write_model


def exported(*layers: nn.Module, example: torch.Tensor) -> ir.Model:
    module = randomize_batchnorms(nn.Sequential(*layers)).eval()
    return to_onnx(module, (example,), outputs=1, dynamic_batch=True, opset=None)


@pytest.fixture
def conv_model() -> ir.Model:
    model = exported(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), example=torch.randn(1, 3, 6, 6)
    )
    model.metadata_props["note"] = "kept"
    return model


class CountingSink(io.RawIOBase):
    """A binary file that only counts what is written to it."""

    def __init__(self) -> None:
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.size += len(data)
        return len(data)


def top_level_fields(data: bytes) -> list[int]:
    """Field numbers of a serialized protobuf message's top-level fields, in file order."""

    def varint(pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = data[pos]
            value |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if byte < 0x80:
                return value, pos

    fields, pos = [], 0
    while pos < len(data):
        tag, pos = varint(pos)
        wire = tag & 7
        if wire == 0:
            _, pos = varint(pos)
        elif wire == 2:
            length, pos = varint(pos)
            pos += length
        else:
            pos += {1: 8, 5: 4}[wire]
        fields.append(tag >> 3)
    assert pos == len(data)
    return fields


def test_the_file_is_one_model_with_one_graph_field(conv_model, tmp_path):
    """Readers that keep only the last copy of a field (Netron, some JavaScript decoders) must see
    the whole graph: the graph is written once, not as messages to be merged."""
    path = tmp_path / "m.onnx"
    with open(path, "wb") as fh:
        write_model(conv_model, fh)
    assert top_level_fields(path.read_bytes()).count(onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number) == 1


def test_the_file_reads_back_as_the_whole_model(conv_model, tmp_path):
    path = tmp_path / "m.onnx"
    with open(path, "wb") as fh:
        write_model(conv_model, fh)
    written, whole = onnx.load(str(path)), ir.serde.serialize_model(conv_model)
    onnx.checker.check_model(written, full_check=True)
    assert len(written.graph.initializer) == 4 and len(written.graph.value_info) > 0
    assert written == whole  # every field: initializers (bytes, order), nodes, value_info, metadata


def test_the_model_is_left_as_it_was(conv_model):
    before = dict(conv_model.graph.initializers)
    write_model(conv_model, CountingSink())
    after = dict(conv_model.graph.initializers)
    assert list(after) == list(before) and all(after[k] is v for k, v in before.items())
    assert all(v.graph is conv_model.graph and v.const_value is not None for v in after.values())


def test_only_one_tensor_is_serialized_at_a_time():
    model = exported(*[nn.Linear(512, 512) for _ in range(8)], example=torch.randn(1, 512))
    largest = max(v.const_value.nbytes for v in model.graph.initializers.values())
    assert tensor_bytes(model) >= 8 * largest
    sink = CountingSink()
    tracemalloc.start()
    try:
        write_model(model, sink)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sink.size > tensor_bytes(model)
    assert peak < 2 * largest, (peak, largest)  # serializing the whole model at once needs > 8x
