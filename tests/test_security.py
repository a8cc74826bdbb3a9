"""Nothing from a model file runs unless it is trusted: malicious pickles through every entry
point, the safe-type allow-list, crafted torch.export archives, and what --arch imports."""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import io
import json
import pathlib
import pickle
import sys

import numpy as np
import pytest
import torch
from hostile import (
    DIGITS,
    DIGITS_ARCH,
    MALICIOUS_CONTAINERS,
    ROOT,
    RunsCommand,
    assert_one_line_error,
    digits_state_dict,
    pickled,
    rewrite_program_json,
    rewrite_zip,
    run_cli,
    snapshot,
    write_malicious,
)
from torch import nn

import bnfold
from bnfold.loading import (
    COMPUTED_GLOBAL,
    _safe_target,
    export_archive_problems,
    load_model,
    pickle_globals,
    resolve_factory,
)


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


# ------------------------------------------------------------------------- malicious pickles
@pytest.mark.parametrize("container", MALICIOUS_CONTAINERS)
def test_load_model_refuses_a_malicious_pickle_and_names_its_globals(tmp_path, container):
    marker = tmp_path / "pwned"
    path = write_malicious(tmp_path / "evil.pt", marker, container)
    with pytest.raises(bnfold.UnsafeModelError) as info:
        load_model(path, arch=DIGITS_ARCH)
    wanted = "io.open" if container == "raw_open" else "posix.system"
    assert wanted in str(info.value) and "--trust-pickle" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("container", MALICIOUS_CONTAINERS)
def test_the_payloads_really_run_when_trusted(tmp_path, container):
    """Control: the same files do run code once trusted, so the refusal above is what stops them."""
    marker = tmp_path / "pwned"
    path = write_malicious(tmp_path / "evil.pt", marker, container)
    with contextlib.suppress(bnfold.BnfoldError):  # it runs, and then it is not a model (or is one)
        load_model(path, arch=DIGITS_ARCH, trust_pickle=True)
    assert marker.exists()


CLI_ENTRY_POINTS = {
    "export": lambda model, t: [
        "export",
        model,
        "-o",
        t / "out.onnx",
        "--arch",
        DIGITS_ARCH,
        "--input-shape",
        "1x1x8x8",
    ],
    "inspect": lambda model, t: ["inspect", model, "--arch", DIGITS_ARCH, "--input-shape", "1x1x8x8"],
    "verify": lambda model, t: ["verify", model, ROOT / "sample_models" / "missing.onnx", "--arch", DIGITS_ARCH],
}


@pytest.mark.parametrize("container", ["zip", "legacy", "checkpoint", "raw_p4"])
@pytest.mark.parametrize("command", list(CLI_ENTRY_POINTS))
def test_every_cli_entry_point_refuses_without_running_it(tmp_path, command, container):
    marker = tmp_path / "pwned"
    path = write_malicious(tmp_path / "evil.pt", marker, container)
    before = snapshot(tmp_path)
    result = run_cli(*CLI_ENTRY_POINTS[command](path, tmp_path))
    assert_one_line_error(result, 3, str(path), "posix.system", "--trust-pickle")
    assert not marker.exists()
    assert snapshot(tmp_path) == before


def test_cli_trust_pickle_runs_it(tmp_path):
    marker = tmp_path / "pwned"
    path = write_malicious(tmp_path / "evil.pt", marker, "zip")
    result = run_cli("inspect", path, "--trust-pickle", "--input-shape", "1x1x8x8")
    assert result.exit_code == 3 and marker.exists()


# ------------------------------------------------------------------------ the safe allow-list
ALLOWED_VALUES = {
    "numpy scalars": [np.dtype(c).type(1) for c in "?bBhHiIlLqQefdgFDG"],
    "numpy arrays": [np.arange(6, dtype=np.float32).reshape(2, 3), np.array(["a", "bc"]), np.array([b"x"])],
    "numpy dtypes": [np.dtype("float64"), np.dtype("uint8")],
    "argparse.Namespace": [argparse.Namespace(lr=0.1, epochs=np.int64(3), name="run")],
}


@pytest.mark.parametrize("kind", list(ALLOWED_VALUES))
def test_harmless_checkpoint_contents_load_without_trust(tmp_path, kind):
    torch.save({"state_dict": digits_state_dict(), "extra": ALLOWED_VALUES[kind]}, tmp_path / "m.pt")
    assert load_model(tmp_path / "m.pt", arch=DIGITS_ARCH).format == "state_dict"


def test_checkpoints_written_with_numpy_1_module_names_load(tmp_path):
    """numpy 1.x pickles scalars as numpy.core.multiarray.scalar; numpy 2 renamed the module."""
    torch.save(
        {"state_dict": digits_state_dict(), "acc": np.float64(0.9)},
        tmp_path / "m.pt",
        _use_new_zipfile_serialization=False,
    )
    data = (tmp_path / "m.pt").read_bytes()
    other = (
        (b"numpy._core.multiarray", b"numpy.core.multiarray")
        if b"numpy._core" in data
        else (b"numpy.core.multiarray", b"numpy._core.multiarray")
    )
    assert other[0] in data
    (tmp_path / "m.pt").write_bytes(data.replace(*other))
    assert load_model(tmp_path / "m.pt", arch=DIGITS_ARCH).format == "state_dict"


@pytest.mark.parametrize(
    "value, name",
    [
        (datetime.datetime(2024, 1, 1), "datetime.datetime"),
        (pathlib.PurePosixPath("/data"), "pathlib.PurePosixPath"),
        (collections.defaultdict(int), "collections.defaultdict"),
        (np.datetime64("2024-01-01"), None),  # a numpy type outside the allow-list
    ],
    ids=["datetime", "path", "defaultdict", "datetime64"],
)
def test_only_the_listed_types_are_allowed(tmp_path, value, name):
    torch.save({"state_dict": digits_state_dict(), "acc": np.float64(0.9), "extra": value}, tmp_path / "m.pt")
    with pytest.raises(bnfold.ModelLoadError) as info:
        load_model(tmp_path / "m.pt", arch=DIGITS_ARCH)
    message = str(info.value)
    assert "--trust-pickle" in message
    if name:  # named, and the allowed numpy types beside it are not
        assert isinstance(info.value, bnfold.UnsafeModelError) and name in message and "numpy" not in message
    assert load_model(tmp_path / "m.pt", arch=DIGITS_ARCH, trust_pickle=True).format == "state_dict"


def test_pickle_scanner_follows_stack_globals_and_memo():
    data = pickle.dumps({"a": np.float64(1), "b": np.float64(2), "c": RunsCommand(pathlib.Path("x"))}, protocol=4)
    found = pickle_globals(io.BytesIO(data))
    assert {"posix.system", "numpy.dtype"} <= found and COMPUTED_GLOBAL not in found
    assert pickle_globals(io.BytesIO(b"\x80\x04\x8c\x02os\x8c\x06system\x93.")) == {"os.system"}
    via_memo = b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94h\x00h\x01\x93."  # BINGET both names back
    assert pickle_globals(io.BytesIO(via_memo)) == {"os.system"}
    # A global whose name is computed (here from two ints) cannot be named statically: flagged.
    assert pickle_globals(io.BytesIO(b"\x80\x04K\x01K\x02\x93.")) == {COMPUTED_GLOBAL}
    # Python 2 names of protocol 0-2 pickles are reported as Python 3 imports them.
    assert pickle_globals(io.BytesIO(b"c__builtin__\nset\n.")) == {"builtins.set"}


def test_garbage_after_a_pickle_header_is_damaged_not_unsafe(tmp_path):
    path = tmp_path / "m.pt"
    path.write_bytes(b"\x80\x02" + bytes(range(7, 200)))
    with pytest.raises(bnfold.ModelLoadError, match="cannot be read safely") as info:
        load_model(path)
    assert not isinstance(info.value, bnfold.UnsafeModelError)


# ------------------------------------------------------------- crafted torch.export archives
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
    assert "--trust-pickle" in str(info.value)
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
    assert _safe_target(target) is safe


def test_genuine_export_archives_have_no_problems(program_file):
    assert export_archive_problems(program_file) == []
    assert export_archive_problems(ROOT / "sample_models" / "shapes_resnet" / "model.pt2") == []
    assert load_model(program_file).format == "torch.export"


# ------------------------------------------------------------------------------------ --arch
def test_arch_imports_only_the_named_module(tmp_path, monkeypatch):
    (tmp_path / "good.py").write_text(
        "import pathlib, torch\npathlib.Path('good_ran').touch()\n"
        "def factory():\n    return torch.nn.Sequential(torch.nn.Linear(2, 2))\n"
    )
    (tmp_path / "evil.py").write_text("import pathlib\npathlib.Path('evil_ran').touch()\n")
    torch.save({"state_dict": nn.Sequential(nn.Linear(2, 2)).state_dict(), "arch": "evil:factory"}, tmp_path / "m.pt")
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    loaded = load_model("m.pt", arch="good:factory")
    assert loaded.format == "state_dict"
    assert (tmp_path / "good_ran").exists()  # documented: --arch runs the module it names
    assert not (tmp_path / "evil_ran").exists()  # and nothing else, whatever the file says
    assert sys.path == path_before  # the current directory was importable only meanwhile
    sys.modules.pop("good", None)


def test_arch_file_path_form_runs_that_file(tmp_path):
    (tmp_path / "net.py").write_text(
        "import pathlib, torch\npathlib.Path(__file__).with_name('ran').touch()\n"
        "def factory():\n    return torch.nn.Linear(2, 2)\n"
    )
    assert callable(resolve_factory(f"{tmp_path / 'net.py'}:factory"))
    assert (tmp_path / "ran").exists()


def test_arch_that_fails_to_import_is_a_usage_error(tmp_path):
    torch.save(digits_state_dict(), tmp_path / "m.pt")
    (tmp_path / "broken.py").write_text("raise ImportError('needs a GPU library')\n")
    result = run_cli("inspect", tmp_path / "m.pt", "--arch", f"{tmp_path / 'broken.py'}:f", "--input-shape", "1x1x8x8")
    assert_one_line_error(result, 2, "--arch", "needs a GPU library")


def test_torchscript_with_arch_is_refused_before_loading(tmp_path):
    with pytest.raises(bnfold.UsageError, match="drop --arch"):
        load_model(DIGITS, arch=DIGITS_ARCH)


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
