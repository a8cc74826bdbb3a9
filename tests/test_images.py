"""Labels and image preprocessing: stored at export, exposed by the Predictor, applied to images."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import write_pngs
from PIL import Image

import bnfold
from bnfold.images import load_image, load_images
from bnfold.metadata import Preprocess

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shapes_onnx(tmp_path_factory) -> str:
    loaded = bnfold.load_model(ROOT / "sample_models" / "shapes_resnet" / "model.pt2")
    path = tmp_path_factory.mktemp("img") / "shapes.onnx"
    return bnfold.export(
        loaded.module, loaded.example_inputs(), path, verify=False, labels=loaded.labels, preprocess=loaded.preprocess
    ).path


def test_the_file_metadata_reaches_the_predictor(shapes_onnx):
    predictor = bnfold.Predictor(shapes_onnx, device="cpu")
    assert predictor.labels == ["circle", "square", "triangle", "cross"]
    assert predictor.preprocess == Preprocess(size=(16, 16), mean=(0.5,), std=(0.5,), channel_order="RGB")


def test_predict_images_matches_predict_on_arrays(shapes_onnx, tmp_path):
    x = np.load(ROOT / "sample_models" / "shapes_resnet" / "test.npz")["x"][:40]
    paths = write_pngs(x, tmp_path)
    predictor = bnfold.Predictor(shapes_onnx, device="cpu")
    from_files = predictor.predict_images(paths)
    from_arrays = predictor.predict(x)
    np.testing.assert_array_equal(from_files.argmax(1), from_arrays.argmax(1))  # 8-bit rounding only


def test_preprocessing_resizes_orders_channels_and_normalises(tmp_path):
    Image.fromarray(np.full((4, 6, 3), (255, 0, 51), dtype=np.uint8)).save(tmp_path / "a.png")
    out = load_images([tmp_path / "a.png"], Preprocess(size=(2, 3), mean=(0.5,), std=(0.5,), channel_order="BGR"))
    assert out.shape == (1, 3, 2, 3)
    np.testing.assert_allclose(out[0, :, 0, 0], [(0.2 - 0.5) / 0.5, -1.0, 1.0], atol=1e-6)


def test_missing_pillow_is_a_clear_error(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_pil(name, *args, **kwargs):
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError("No module named 'PIL'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pil)
    with pytest.raises(bnfold.UsageError, match=r"bnfold\[images\]"):
        load_images([tmp_path / "x.png"], Preprocess(size=(2, 2), mean=(0.0,), std=(1.0,)))


def test_images_need_preprocessing_metadata(tmp_path):
    loaded = bnfold.load_model(ROOT / "sample_models" / "shapes_resnet" / "model.pt2")
    path = bnfold.export(loaded.module, loaded.example_inputs(), tmp_path / "m.onnx", verify=False).path
    predictor = bnfold.Predictor(path, device="cpu")
    assert predictor.preprocess is None
    with pytest.raises(bnfold.UsageError, match=r"has no preprocessing metadata.*export it with image preprocessing"):
        predictor.predict_images(write_pngs(np.zeros((1, 3, 16, 16), np.float32), tmp_path))


def test_labels_must_match_the_class_count(tmp_path):
    loaded = bnfold.load_model(ROOT / "sample_models" / "shapes_resnet" / "model.pt2")
    with pytest.raises(bnfold.UsageError, match="3 label"):
        bnfold.export(loaded.module, loaded.example_inputs(), tmp_path / "m.onnx", labels=["a", "b", "c"], verify=False)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(size=(0, 4), mean=(0.0,), std=(1.0,)), "HxW"),
        (dict(size=(4, 4), mean=(0.0, 1.0), std=(1.0,)), "`preprocess.mean`"),
        (dict(size=(4, 4), mean=(0.0,), std=(0.0,)), "non-zero"),
        (dict(size=(4, 4), mean=(0.0,), std=(1.0,), channel_order="CMYK"), "RGB"),
    ],
)
def test_invalid_preprocessing_is_refused(kwargs, match):
    with pytest.raises(bnfold.UsageError, match=match):
        Preprocess(**kwargs)


def test_an_open_file_reads_like_its_path_and_errors_name_it(tmp_path):
    import io

    paths = write_pngs(np.load(ROOT / "sample_models" / "shapes_resnet" / "test.npz")["x"][:1], tmp_path)
    preprocess = Preprocess(size=(16, 16), mean=(0.5,), std=(0.5,))
    from_bytes = load_image(io.BytesIO(paths[0].read_bytes()), preprocess, name="s3://b/img.png")
    np.testing.assert_array_equal(from_bytes, load_images(paths, preprocess)[0])
    with pytest.raises(
        bnfold.UsageError, match=r"^s3://b/x.png: not a readable image \(cannot identify the image format\)$"
    ):
        load_image(io.BytesIO(b"not an image"), preprocess, name="s3://b/x.png")
