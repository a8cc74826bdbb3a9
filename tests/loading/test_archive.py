"""Crafted ``torch.export`` archives are refused before torch reads them: code in node targets,
shape expressions, guards and pickled members; archives torch writes pass the check."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib

import pytest
import torch
from hostile import (
    ROOT,
    RunsCommand,
    assert_one_line_error,
    pickled,
    rewrite_program_json,
    rewrite_zip,
    run_cli,
)
from torch import nn

import bnfold
from bnfold.loading import export_archive_problems, load_model
from bnfold.loading.archive import safe_target


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)).flatten(1).reshape(x.shape[0], -1)


@pytest.fixture(scope="module")
def program_file(tmp_path_factory) -> pathlib.Path:
    """A torch.export archive with a dynamic batch (so it records shape expressions)."""
    path = tmp_path_factory.mktemp("pt2") / "net.pt2"
    batch = torch.export.Dim("batch", min=1)
    torch.export.save(
        torch.export.export(Net().eval(), (torch.randn(2, 3, 6, 6),), dynamic_shapes=({0: batch},)), str(path)
    )
    return path


def _pickle_in_sample_inputs(source, target, marker):
    return rewrite_zip(source, target, lambda n, d: pickled(RunsCommand(marker)) if "sample_inputs" in n else d)


def _shape_expression(source, target, marker):
    def change(doc):
        text = f"__import__('os').system('touch {marker}') or s77"
        replace_first(doc, "expr_str", text)

    return rewrite_program_json(source, target, change)


def _guard(source, target, marker):
    return rewrite_program_json(
        source, target, lambda doc: doc.__setitem__("guards_code", [f"__import__('os').system('touch {marker}') == 0"])
    )


def replace_first(doc, key, value) -> None:
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if key in item:
                item[key] = value
                return
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    raise AssertionError(f"no {key} in the document")


PT2_ATTACKS = {
    "sample-inputs pickle": _pickle_in_sample_inputs,
    "shape expression": _shape_expression,
    "guard code": _guard,
}


@pytest.mark.parametrize("attack", list(PT2_ATTACKS))
def test_crafted_export_archives_are_refused_before_torch_reads_them(program_file, tmp_path, attack):
    marker = tmp_path / "pwned"
    path = PT2_ATTACKS[attack](program_file, tmp_path / "evil.pt2", marker)
    with pytest.raises(bnfold.UnsafeModelError, match="would run code from the file") as info:
        load_model(path)
    assert "`trust_pickle=True`" in str(info.value)
    assert not marker.exists()
    result = run_cli("inspect", path)
    assert_one_line_error(result, 3, str(path), "--trust-pickle")
    assert not marker.exists()
    # Control: torch itself runs the payload, at load or when the model runs.
    with contextlib.suppress(bnfold.BnfoldError):
        loaded = load_model(path, trust_pickle=True)
        loaded.module(*loaded.example_inputs())
    assert marker.exists()


def test_graph_targets_outside_aten_are_refused(program_file, tmp_path):
    def change(doc):
        node = doc["graph_module"]["graph"]["nodes"][0]
        node["target"] = "torch.serialization.os.system"

    path = rewrite_program_json(program_file, tmp_path / "evil.pt2", change)
    problems = export_archive_problems(path)
    assert len(problems) == 1 and "calls torch.serialization.os.system" in problems[0]
    with pytest.raises(bnfold.UnsafeModelError):
        load_model(path)


@pytest.mark.parametrize(
    "target, safe",
    [
        ("torch.ops.aten.conv2d.default", True),
        ("torch.ops.aten._native_batch_norm_legit_no_training.default", True),
        ("torch.ops.higher_order.cond", True),
        ("_operator.getitem", True),
        ("math.ceil", True),
        ("torch.sym_max", True),
        ("torch.serialization.os.system", False),
        ("_operator.attrgetter", False),
        ("_operator.call", False),
        ("torch.ops.aten.add.Tensor.__call__", False),
        ("torch.hub.load", False),
        ("torch.ops.myns.op.default", False),
    ],
)
def test_node_target_rule(target, safe):
    assert safe_target(target) is safe


def test_genuine_export_archives_have_no_problems(program_file):
    assert export_archive_problems(program_file) == []
    assert export_archive_problems(ROOT / "sample_models" / "shapes_resnet" / "model.pt2") == []
    assert load_model(program_file).format == "torch.export"


@pytest.mark.parametrize("also_raw", [False, True], ids=["pickled-weight", "declared-raw-and-pickled"])
def test_pickled_weights_in_an_export_archive_are_scanned(program_file, tmp_path, also_raw):
    """A weight stored as a pickle (``use_pickle: true``) is unpickled fully by torch; a config
    cannot hide it by also declaring its member as raw tensor bytes."""
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(RunsCommand(marker), buf, _use_new_zipfile_serialization=False)
    payload = buf.getvalue() + bytes(-len(buf.getvalue()) % 4)  # whole float32s, to pass as raw bytes

    def change(name: str, data: bytes) -> bytes:
        if name.endswith("weights/weight_0"):
            return payload
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)["config"]
            first = next(iter(config.values()))  # the entry of weight_0
            if also_raw:  # keep it raw, sized to fit, and add a pickled entry for the same member
                first["tensor_meta"].update(sizes=[{"as_int": len(payload) // 4}], strides=[{"as_int": 1}])
                config["evil"] = {**first, "use_pickle": True}
            else:
                first["use_pickle"] = True
            return json.dumps({"config": config}).encode()
        return data

    path = rewrite_zip(program_file, tmp_path / "evil.pt2", change)
    with pytest.raises(bnfold.UnsafeModelError, match=r"weight_0 imports posix\.system"):
        load_model(path)
    assert not marker.exists()
    with contextlib.suppress(bnfold.BnfoldError):  # control: torch unpickles it
        load_model(path, trust_pickle=True)
    assert marker.exists()
