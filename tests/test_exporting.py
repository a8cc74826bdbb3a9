"""ONNX export: dynamic/static batch, metadata, atomic writes, refusing to overwrite the input."""

from __future__ import annotations

import errno
import gc
import importlib
import json
import os
import signal
from pathlib import Path

import onnx
import pytest
import torch
from helpers import random_input, randomize_batchnorms
from torch import nn

import bnfold
from bnfold import staging
from bnfold.predictor import Predictor
from bnfold.staging import atomic_write

export_module = importlib.import_module("bnfold.exporting")


def model() -> nn.Module:
    return randomize_batchnorms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))


def test_dynamic_batch_by_default_and_metadata(tmp_path):
    result = bnfold.export(model(), (random_input(1, 3, 8, 8),), tmp_path / "m.onnx")
    proto = onnx.load(result.path)
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["bnfold_version"] == bnfold.__version__
    assert json.loads(meta["bnfold_fold_report"])["folded"] == 1
    assert json.loads(meta["bnfold_output_names"]) == ["output"]
    assert meta["bnfold_weight_dtype"] == "float32"
    out = Predictor(result.path, device="cpu").predict(random_input(5, 3, 8, 8).numpy())
    assert out.shape == (5, 4, 6, 6)


@pytest.mark.parametrize("keep_io_types", [False, True])
def test_a_float16_export_records_its_weight_dtype(tmp_path, keep_io_types):
    path = bnfold.export(
        model(), (random_input(1, 3, 8, 8),), tmp_path / "m.onnx", fp16=True, keep_io_types=keep_io_types, verify=False
    ).path
    proto = onnx.load(path)
    assert {p.key: p.value for p in proto.metadata_props}["bnfold_weight_dtype"] == "float16"
    assert onnx.TensorProto.FLOAT16 in {t.data_type for t in proto.graph.initializer}


def test_static_batch(tmp_path):
    result = bnfold.export(model(), (random_input(3, 3, 8, 8),), tmp_path / "m.onnx", dynamic_batch=False)
    dim = onnx.load(result.path).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_value == 3
    assert result.verify_report.batch_sizes == [3]


class FixedBatch(nn.Module):
    def forward(self, x):
        return x.reshape(2, -1)


def test_model_that_cannot_take_a_dynamic_batch_says_how_to_proceed(tmp_path):
    with pytest.raises(bnfold.FoldError, match="`dynamic_batch=False`"):
        bnfold.export(FixedBatch(), (torch.randn(2, 3),), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_opset_is_recorded(tmp_path):
    assert bnfold.export(model(), (random_input(1, 3, 8, 8),), tmp_path / "m.onnx", opset=18).opset == 18


def test_output_equal_to_input_is_refused(tmp_path):
    source = tmp_path / "model.onnx"
    source.write_bytes(b"original")
    with pytest.raises(bnfold.UsageError, match="is the input"):
        bnfold.export(model(), (random_input(1, 3, 8, 8),), source, source=source)
    assert source.read_bytes() == b"original"


def test_interrupt_leaves_no_partial_file(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("bnfold.exporting"), "verify_onnx", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bnfold.export(model(), (random_input(1, 3, 8, 8),), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_garbage_collection_is_not_lost():
    """Python prints and ignores a KeyboardInterrupt raised inside a finalizer the collector runs;
    collect_garbage holds SIGINT and raises it once the collection is over."""
    export_module = importlib.import_module("bnfold.exporting")
    interrupt_sent: list[bool] = []

    def send_sigint(phase, info):
        if phase == "start" and not interrupt_sent:
            interrupt_sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    gc.callbacks.append(send_sigint)  # the collector reads this very list
    try:
        with pytest.raises(KeyboardInterrupt):
            export_module.collect_garbage()
    finally:
        gc.callbacks.remove(send_sigint)
    assert interrupt_sent and signal.getsignal(signal.SIGINT) is signal.default_int_handler


class InterruptedAfter(bnfold.progress.Progress):
    """Ctrl-C as a step finishes, after its work (here: writing the temporary file) is done."""

    def __init__(self, step: str) -> None:
        self.step, self.current = step, ""

    def start(self, step: str) -> None:
        self.current = step

    def finish(self) -> None:
        if self.current == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize(
    "step",
    [
        "Capturing the model (torch.export)",
        "Folding batch-norms, proven in float64",
        "Exporting to ONNX",
        "Verifying in ONNX Runtime",
    ],
)
def test_an_interrupt_at_any_step_leaves_nothing(tmp_path, step):
    with pytest.raises(KeyboardInterrupt):
        bnfold.export(model(), (random_input(1, 3, 8, 8),), tmp_path / "m.onnx", progress=InterruptedAfter(step))
    assert list(tmp_path.iterdir()) == []


def test_the_exporters_graph_lets_go_of_the_weights_when_export_fails(tmp_path, monkeypatch):
    """onnxscript keeps the last graph it rewrote alive: its weights are dropped even on errors."""
    export_module = importlib.import_module("bnfold.exporting")
    released = []
    monkeypatch.setattr(export_module, "release_weights", lambda m: released.append(len(m.graph.initializers)))
    with pytest.raises(bnfold.errors.UsageError, match="`labels`"):
        bnfold.export(model(), (random_input(1, 3, 8, 8),), tmp_path / "m.onnx", labels=["only one"])
    assert released and released[0] > 0 and list(tmp_path.iterdir()) == []


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_atomic_write_without_a_temporary_file_is_an_output_error(tmp_path, monkeypatch):
    monkeypatch.setattr(staging.tempfile, "mkstemp", no_space)
    written = []
    with pytest.raises(bnfold.errors.OutputError, match=r"r\.json: No space left on device; nothing was written"):
        atomic_write(tmp_path / "r.json", written.append)
    assert written == [] and list(tmp_path.iterdir()) == []


def test_atomic_write_whose_rename_fails_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    target.write_text("old")
    monkeypatch.setattr(staging.os, "replace", no_space)
    with pytest.raises(bnfold.errors.OutputError, match="No space left on device"):
        atomic_write(target, lambda fh: fh.write(b"new"))
    assert list(tmp_path.iterdir()) == [target] and target.read_text() == "old"


def test_export_whose_final_rename_fails_leaves_nothing(tmp_path, monkeypatch):
    real_replace = os.replace
    renamed_onto_target = []

    def fails_onto_the_target(src, dst):
        if Path(dst) == tmp_path / "m.onnx":
            renamed_onto_target.append(src)
            no_space()
        real_replace(src, dst)

    monkeypatch.setattr(staging.os, "replace", fails_onto_the_target)
    with pytest.raises(bnfold.errors.OutputError, match=r"m\.onnx: No space left on device"):
        bnfold.export(model(), (random_input(1, 3, 8, 8),), tmp_path / "m.onnx")
    assert renamed_onto_target and list(tmp_path.iterdir()) == []


def test_a_batchnorm_count_that_differs_from_the_fold_report_writes_nothing(tmp_path, monkeypatch):
    """The ONNX graph's BatchNormalization count must equal the fold report's kept count, even
    when verification passes (here: one more node than the report keeps)."""
    count_ops = export_module.count_ops
    monkeypatch.setattr(export_module, "count_ops", lambda m, op: count_ops(m, op) + (op == "BatchNormalization"))
    with pytest.raises(
        bnfold.VerificationError, match=r"1 BatchNormalization node\(s\) but the fold report keeps 0"
    ) as info:
        bnfold.export(model(), (random_input(1, 3, 8, 8),), tmp_path / "m.onnx")
    assert info.value.report is not None and info.value.report.passed
    assert list(tmp_path.iterdir()) == []
