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

from bnfold.export import to_onnx
from bnfold.onnx_writer import tensor_bytes, write_model


def exported(*layers: nn.Module, example: torch.Tensor) -> ir.Model:
    module = randomize_batchnorms(nn.Sequential(*layers)).eval()
    return to_onnx(module, (example,), outputs=1, dynamic_batch=True, opset=None)


@pytest.fixture
def conv_model() -> ir.Model:
    model = exported(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), example=torch.randn(1, 3, 6, 6))
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


def test_the_file_reads_back_as_the_whole_model(conv_model, tmp_path):
    path = tmp_path / "m.onnx"
    with open(path, "wb") as fh:
        write_model(conv_model, fh)
    written, whole = onnx.load(str(path)), ir.serde.serialize_model(conv_model)
    onnx.checker.check_model(written, full_check=True)
    assert len(written.graph.initializer) == 4
    assert list(written.graph.initializer) == list(whole.graph.initializer)  # names, types, bytes, order
    for field in ("node", "input", "output"):
        assert list(getattr(written.graph, field)) == list(getattr(whole.graph, field)), field
    assert list(written.opset_import) == list(whole.opset_import)
    assert list(written.metadata_props) == list(whole.metadata_props)
    # the only difference: no redundant value_info entries for initializers (they carry their own type)
    names = {t.name for t in whole.graph.initializer}
    assert list(written.graph.value_info) == [v for v in whole.graph.value_info if v.name not in names]


def test_the_model_is_left_as_it_was(conv_model):
    before = dict(conv_model.graph.initializers)
    write_model(conv_model, CountingSink())
    after = dict(conv_model.graph.initializers)
    assert list(after) == list(before) and all(after[k] is v for k, v in before.items())
    assert all(v.graph is conv_model.graph for v in after.values())


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
