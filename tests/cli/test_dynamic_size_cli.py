"""``--dynamic-size`` on the command line: export states the sizes and verifies at three, the
preprocessing keeps each image's size, inspect (of the model or the ONNX file) says fixed or dynamic, predict runs images of
several sizes, and a model that fixes its size is exit 3 naming the flag."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from bnfold.cli.main import main
from click.testing import CliRunner
from PIL import Image
from sized_models import HardReshape, UNetLike, model

from bnfold.predictor import Predictor

SIZED_MODELS = Path(__file__).resolve().parents[1] / "sized_models.py"


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def weights(folder: Path, kind: type) -> Path:
    path = folder / f"{kind.__name__}.pt"
    torch.save(model(kind).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def unet_onnx(tmp_path_factory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("cli-sizes")
    out = folder / "unet.onnx"
    result = invoke(
        "export",
        weights(folder, UNetLike),
        "--arch",
        f"{SIZED_MODELS}:UNetLike",
        "--input-shape",
        "1x3x32x32",
        "--dynamic-size",
        "--preprocess-mean",
        "0.5",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    return out, result.stdout


def test_export_states_the_sizes_and_verifies_at_three(unet_onnx):
    path, stdout = unet_onnx
    assert "Image size: dynamic, height a multiple of 8, at least 16; width a multiple of 8, at least 16" in stdout
    assert "dynamic batch, dynamic size," in stdout and "image sizes 32x32, 24x32, 40x48)" in stdout
    predictor = Predictor(path, device="cpu")
    assert predictor.preprocess.size is None  # the stored preprocessing keeps each image's size
    assert predictor.image_sizes["x"].example == (32, 32)
    inspected = invoke("inspect", path)
    assert inspected.exit_code == 0, inspected.output
    assert "  image size: dynamic, input 'x': height a multiple of 8, at least 16; width" in inspected.stdout
    assert "  preprocessing: each image at its own size, RGB" in inspected.stdout


def test_inspect_says_whether_the_size_is_fixed_or_dynamic(tmp_path):
    path = weights(tmp_path, UNetLike)
    common = ("inspect", path, "--arch", f"{SIZED_MODELS}:UNetLike", "--input-shape", "1x3x32x32")
    fixed = invoke(*common)
    assert fixed.exit_code == 0 and "image size fixed" in fixed.stdout
    dynamic = invoke(*common, "--dynamic-size", "--json")
    assert dynamic.exit_code == 0, dynamic.output
    report = json.loads(dynamic.stdout)
    assert report["dynamic_size"] is True and report["image_sizes"][0]["height"]["multiple_of"] == 8


def test_predict_runs_images_of_several_sizes(unet_onnx, tmp_path):
    path, _ = unet_onnx
    rng = np.random.default_rng(0)
    for name, size in [("a.png", (32, 24)), ("b.png", (16, 40)), ("c.png", (32, 24))]:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / name)
    out = tmp_path / "preds.npz"
    result = invoke("predict", path, tmp_path, "-o", out)
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[1] for line in result.stdout.splitlines()[:3]] == ["3x32x24", "3x16x40", "3x32x24"]
    with np.load(out) as saved:
        assert sorted(saved) == ["output_0", "output_1", "output_2"] and saved["output_1"].shape == (3, 16, 40)
    Image.fromarray(rng.integers(0, 256, (30, 24, 3), dtype=np.uint8)).save(tmp_path / "odd.png")
    refused = invoke("predict", path, tmp_path / "odd.png")
    assert refused.exit_code == 2 and "image size 30x24 is not one the model takes: height 30" in refused.stderr


def test_a_model_that_fixes_its_size_is_exit_3_naming_the_flag(tmp_path):
    result = invoke(
        "export",
        weights(tmp_path, HardReshape),
        "--arch",
        f"{SIZED_MODELS}:HardReshape",
        "--input-shape",
        "1x3x16x16",
        "--dynamic-size",
        "--no-verify",
    )
    assert result.exit_code == 3
    assert "cannot take a dynamic image size" in result.stderr and "in aten.view at " in result.stderr
    assert result.stderr.strip().endswith("without --dynamic-size")
