"""`bnfold predict` and the export options that feed it (labels, preprocessing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from bnfold.cli.main import main
from click.testing import CliRunner
from PIL import Image
from torch import nn

import bnfold

ROOT = Path(__file__).resolve().parents[2]
SHAPES = ROOT / "sample_models" / "shapes_resnet"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def shapes_onnx(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "shapes.onnx"
    result = invoke("export", SHAPES / "model.pt2", "-o", out, "--no-verify")
    assert result.exit_code == 0, result.stderr
    return out


def test_predict_npz_prints_top_k_labels_and_writes_outputs(shapes_onnx, tmp_path):
    preds = tmp_path / "preds.npz"
    result = invoke("predict", shapes_onnx, SHAPES / "test.npz", "-o", preds, "--top-k", "2", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 301 and lines[-1] == f"Wrote {preds}"
    name, best = lines[0].split("\t")
    assert name == "0" and best.count("(") == 2 and best.split(" ")[0] in {"circle", "square", "triangle", "cross"}
    saved = np.load(preds)
    assert saved["output"].shape == (300, 4)
    test = np.load(SHAPES / "test.npz")
    assert (saved["output"].argmax(1) == test["y"]).mean() > 0.95


def test_predict_on_an_onnx_model_does_not_import_torch(shapes_onnx):
    """torch takes seconds to import; `bnfold predict` (and so `--ray`, `serve`) does not need it."""
    code = (
        "import atexit, sys; atexit.register(lambda: print('torch imported:', 'torch' in sys.modules, file=sys.stderr)); "
        "from bnfold.cli.main import main; main()"
    )
    args = ["predict", str(shapes_onnx), str(SHAPES / "test.npz"), "--device", "cpu"]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stderr


def test_predict_json_lines(shapes_onnx):
    result = invoke("predict", shapes_onnx, SHAPES / "test.npz", "--json", "--top-k", "3", "--device", "cpu")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 300 and len(rows[0]["top_k"]) == 3
    assert rows[0]["top_k"][0]["score"] >= rows[0]["top_k"][1]["score"]
    assert result.stderr == ""


def test_predict_a_folder_of_images(shapes_onnx, tmp_path):
    x = np.load(SHAPES / "test.npz")["x"][:5]
    for i, chw in enumerate(x):
        Image.fromarray(np.clip((chw * 0.5 + 0.5) * 255, 0, 255).astype(np.uint8).transpose(1, 2, 0)).save(
            tmp_path / f"{i}.png"
        )
    result = invoke("predict", shapes_onnx, tmp_path, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["sample"]).name for r in rows] == [f"{i}.png" for i in range(5)]


def test_predict_a_folder_of_arrays_names_each_row_by_file_and_row(shapes_onnx, tmp_path):
    x = np.load(SHAPES / "test.npz")["x"][:5]
    np.save(tmp_path / "b.npy", x[3:])
    np.savez(tmp_path / "a.npz", x=x[:3])
    result = invoke("predict", shapes_onnx, tmp_path, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["sample"] for r in rows] == [f"{tmp_path / 'a.npz'}:{i}" for i in range(3)] + [
        f"{tmp_path / 'b.npy'}:{i}" for i in range(2)
    ]
    best = bnfold.Predictor(shapes_onnx, device="cpu").predict(x).argmax(1)
    assert [r["top_k"][0]["class"] for r in rows] == best.tolist()


def test_the_input_is_run_in_batches_of_batch_size(shapes_onnx, monkeypatch):
    seen: list[int] = []
    real_predict = bnfold.Predictor.predict

    def recording(self, x, **kwargs):
        seen.append(len(next(iter(x.values()))))
        return real_predict(self, x, **kwargs)

    monkeypatch.setattr(bnfold.Predictor, "predict", recording)
    result = invoke("predict", shapes_onnx, SHAPES / "test.npz", "--batch-size", "64", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    assert seen == [64, 64, 64, 64, 44] and len(result.stdout.splitlines()) == 300


def test_without_cuda_auto_warns_once_and_cuda_is_an_error(shapes_onnx, monkeypatch):
    """The CUDA fallback on any host: onnxruntime is made to offer no CUDA provider."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    reason = f"this onnxruntime build ({ort.__version__}) has no CUDA provider"
    result = invoke("predict", shapes_onnx, SHAPES / "test.npz", "--device", "auto", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith(f"bnfold: warning: running on CPU: {reason}")
    assert len(result.stderr.splitlines()) == 1 and len(result.stdout.splitlines()) == 300
    result = invoke("predict", shapes_onnx, SHAPES / "test.npz", "--device", "cuda")
    assert result.exit_code == 3 and result.stdout == ""
    assert result.stderr.startswith(f"bnfold: error: --device cuda: {reason}")
    assert "(--device auto falls back to the CPU)" in result.stderr


def test_images_need_preprocessing_metadata(tmp_path):
    loaded = bnfold.load_model(SHAPES / "model.pt2")
    path = bnfold.export(loaded.module, loaded.example_inputs(), tmp_path / "m.onnx", verify=False).path
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    result = invoke("predict", path, tmp_path / "a.png", "--device", "cpu")
    assert result.exit_code == 2
    assert "cannot read images: export it with image preprocessing (bnfold export --preprocess-*" in result.stderr


def test_export_options_store_labels_and_preprocessing(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\nd\n")
    out = tmp_path / "m.onnx"
    result = invoke(
        "export",
        SHAPES / "model.pt2",
        "-o",
        out,
        "--no-verify",
        "--labels",
        labels,
        "--preprocess-mean",
        "0.4,0.5,0.6",
        "--preprocess-std",
        "0.2",
        "--preprocess-channels",
        "BGR",
    )
    assert result.exit_code == 0, result.stderr
    predictor = bnfold.Predictor(out, device="cpu")
    assert predictor.labels == ["a", "b", "c", "d"]
    assert predictor.preprocess.mean == (0.4, 0.5, 0.6) and predictor.preprocess.channel_order == "BGR"
    assert predictor.preprocess.size == (16, 16)  # the file's


# (channels, --preprocess-* options) -> what export stores for a model file that carries no preprocessing
PREPROCESS_DEFAULTS = {
    "nothing-given": (3, [], None),
    "grayscale-from-one-channel": (1, ["--preprocess-mean", "0.5"], ((6, 6), (0.5,), (1.0,), "L")),
    "rgb-from-three-channels": (3, ["--preprocess-size", "4x5"], ((4, 5), (0.0,), (1.0,), "RGB")),
    "given-channel-order-wins": (
        3,
        ["--preprocess-channels", "BGR", "--preprocess-std", "2"],
        ((6, 6), (0.0,), (2.0,), "BGR"),
    ),
}


@pytest.mark.parametrize("case", list(PREPROCESS_DEFAULTS), ids=list(PREPROCESS_DEFAULTS))
def test_export_fills_unset_preprocessing_from_the_input(case, tmp_path):
    channels, options, expected = PREPROCESS_DEFAULTS[case]
    model = tmp_path / "m.pt"
    net = nn.Sequential(nn.Conv2d(channels, 2, 3), nn.Flatten(), nn.Linear(32, 4)).eval()
    example = torch.zeros(1, channels, 6, 6)
    torch.jit.save(torch.jit.trace(net, example), str(model))
    result = invoke(
        "export", model, "-o", tmp_path / "m.onnx", "--no-verify", "--input-shape", f"1x{channels}x6x6", *options
    )
    assert result.exit_code == 0, result.stderr
    stored = bnfold.Predictor(tmp_path / "m.onnx", device="cpu").preprocess
    if expected is None:
        assert stored is None
    else:
        assert (stored.size, stored.mean, stored.std, stored.channel_order) == expected


PREDICT_ERRORS = {
    "missing-model": (lambda t, m: ["predict", t / "nope.onnx", SHAPES / "test.npz"], 3, "does not exist"),
    "not-onnx": (
        lambda t, m: ["predict", SHAPES / "test.npz", SHAPES / "test.npz"],
        3,
        "cannot be loaded by ONNX Runtime",
    ),
    "wrong-shape": (
        lambda t, m: ["predict", m, (t / "x.npy", np.save(t / "x.npy", np.zeros((2, 3, 8, 8), np.float32)))[0]],
        2,
        "expected shape Nx3x16x16",
    ),
    "int-data": (
        lambda t, m: ["predict", m, (t / "x.npy", np.save(t / "x.npy", np.zeros((2, 3, 16, 16), np.int64)))[0]],
        2,
        "dtype int64",
    ),
    "bad-npz-names": (
        lambda t, m: ["predict", m, (t / "x.npz", np.savez(t / "x.npz", a=np.zeros(2), b=np.zeros(2)))[0]],
        2,
        "no array named",
    ),
    "missing-input": (lambda t, m: ["predict", m, t / "nope.npy"], 2, "does not exist"),
    "not-an-image": (
        lambda t, m: ["predict", m, (t / "x.png", (t / "x.png").write_text("no"))[0]],
        2,
        "not a readable image",
    ),
    "empty-folder": (lambda t, m: ["predict", m, (t / "d", (t / "d").mkdir())[0]], 2, "no input files"),
    "mixed-sample-shapes": (
        lambda t, m: [
            "predict",
            m,
            *[(t / n, np.save(t / n, np.zeros((1, 3, s, s), np.float32)))[0] for n, s in (("a.npy", 16), ("b.npy", 8))],
        ],
        2,
        "samples of input 'x' have shape (3, 16, 16) in",
    ),
    "parquet": (
        lambda t, m: ["predict", m, (t / "x.parquet", (t / "x.parquet").write_text(""))[0]],
        2,
        "bnfold predict --ray",
    ),
    "bad-device": (lambda t, m: ["predict", m, SHAPES / "test.npz", "--device", "tpu"], 2, "tpu"),
    "bad-top-k": (lambda t, m: ["predict", m, SHAPES / "test.npz", "--top-k", "0"], 2, "--top-k"),
    "bad-batch-size": (lambda t, m: ["predict", m, SHAPES / "test.npz", "--batch-size", "0"], 2, "--batch-size"),
    "missing-output-folder": (
        lambda t, m: ["predict", m, SHAPES / "test.npz", "-o", t / "no" / "p.npz"],
        2,
        "does not exist",
    ),
}


@pytest.mark.parametrize("case", list(PREDICT_ERRORS), ids=list(PREDICT_ERRORS))
def test_predict_errors(case, shapes_onnx, tmp_path):
    make_args, code, text = PREDICT_ERRORS[case]
    args = make_args(tmp_path, shapes_onnx)
    before = sorted(tmp_path.rglob("*"))
    result = invoke(*args, *([] if "--device" in map(str, args) else ["--device", "cpu"]))
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert text in result.stderr
    if code != 2 or "Error:" not in result.stderr:  # bnfold's own errors are one line
        assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(tmp_path.rglob("*")) == before
