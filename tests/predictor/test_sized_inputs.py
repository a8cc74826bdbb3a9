"""A dynamic-size model in the Predictor: inputs of any size it takes run, a size it does not take
is a one-line error naming the allowed sizes, and images of several sizes run in groups of one
size (never padded), their outputs joined in order or listed per image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sized_models import halved, halving_onnx

import bnfold
from bnfold.predictor import Predictor


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    return Predictor(halving_onnx(tmp_path_factory.mktemp("sizes") / "halving.onnx"), device="cpu")


@pytest.mark.parametrize("shape", [(3, 1, 4, 6), (1, 1, 10, 2), (2, 1, 8, 8)])
def test_any_size_the_model_takes_runs(predictor, shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    outputs = predictor.predict(x)
    np.testing.assert_allclose(outputs["y"], halved(x), rtol=1e-6)


def test_a_size_it_does_not_take_is_one_line_naming_the_allowed_sizes(predictor):
    with pytest.raises(bnfold.UsageError) as caught:
        predictor.predict(np.zeros((1, 1, 5, 6), np.float32))
    assert str(caught.value) == (
        "input 'x': image size 5x6 is not one the model takes: height 5: expected a multiple of 2, at least 2 "
        "(nearest: 4 or 6)"
    )


def _png(folder, name: str, pixels: np.ndarray) -> str:
    path = folder / name
    Image.fromarray(pixels).save(path)
    return str(path)


def test_images_of_several_sizes_run_grouped_by_size_and_come_back_in_order(predictor, tmp_path):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size, dtype=np.uint8) for size in [(4, 6), (8, 2), (4, 6)]]
    paths = [_png(tmp_path, f"{i}.png", pixels) for i, pixels in enumerate(images)]
    runs = []
    real_predict = predictor.predict
    predictor.predict = lambda x: runs.append(x.shape) or real_predict(x)
    try:
        results = predictor.predict_images(paths)
    finally:
        del predictor.predict
    assert runs == [(2, 1, 4, 6), (1, 1, 8, 2)]  # one run per size, the images of one size together
    assert isinstance(results, list) and len(results) == 3  # a segmentation: one result per image
    for pixels, result in zip(images, results):
        x = pixels[None, None].astype(np.float32) / 255
        np.testing.assert_allclose(result["y"], halved(x), rtol=1e-5)
        np.testing.assert_allclose(result["mean"], x.mean(axis=(2, 3)), rtol=1e-5)
    with pytest.raises(bnfold.UsageError, match=r"image size 3x6 is not one the model takes: height 3"):
        predictor.predict_images([_png(tmp_path, "odd.png", images[0][:3])])
