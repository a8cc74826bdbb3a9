"""Calibration data: read from arrays or an image folder, checked against the model's inputs,
split into calibration and held-out samples the same way every run, fed in batches."""

from __future__ import annotations

import re

import numpy as np
import pytest
from helpers import write_pngs

from bnfold.errors import Param, UsageError
from bnfold.metadata import Preprocess
from bnfold.predictor import TensorSpec
from bnfold.quantization.calibration import (
    DEFAULT_CALIBRATION_CAP,
    MIN_HELD_OUT,
    BatchReader,
    read_calibration,
    split_data,
    split_indices,
)

SPECS = [TensorSpec("x", ("batch", 3, 8, 8), np.dtype(np.float32))]
PREPROCESS = Preprocess(size=(8, 8), mean=(0.5,), std=(0.5,))


def data(samples: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((samples, 3, 8, 8)).astype(np.float32)


def test_by_default_half_the_data_calibrates_and_the_rest_verifies():
    calibrate, held_out = split_indices(100, None)
    assert len(calibrate) == 50 and len(held_out) == 50
    assert sorted({*calibrate, *held_out}) == list(range(100))  # disjoint, every sample used once
    assert list(calibrate) != list(range(50))  # shuffled: data sorted by class is split evenly
    again = split_indices(100, None)
    assert np.array_equal(again[0], calibrate)  # the same split every run


def test_calibration_is_capped_and_the_rest_verifies():
    calibrate, held_out = split_indices(2000, None)
    assert len(calibrate) == DEFAULT_CALIBRATION_CAP and len(held_out) == 2000 - DEFAULT_CALIBRATION_CAP
    calibrate, held_out = split_indices(100, 80)
    assert len(calibrate) == 80 and len(held_out) == MIN_HELD_OUT


@pytest.mark.parametrize(
    ("samples", "calibration_samples", "param"),
    [
        (2 * MIN_HELD_OUT - 2, None, Param("calibration")),
        (100, 100 - MIN_HELD_OUT + 1, Param("calibration_samples")),
    ],
)
def test_too_few_samples_for_the_split_name_the_option(samples, calibration_samples, param):
    with pytest.raises(UsageError) as raised:
        split_indices(samples, calibration_samples, "d.npz")
    assert raised.value.params()[0] == param and "d.npz" in str(raised.value) and "\n" not in str(raised.value)


def test_split_data_says_how_it_split(tmp_path):
    np.save(tmp_path / "d.npy", data(60))
    split = split_data(tmp_path / "d.npy", SPECS, None, 20)
    assert split.calibration_samples == 20 and split.held_out_samples == 40
    assert split.source == str(tmp_path / "d.npy") and "20 sample(s) calibrate, the other 40 verify" in split.split


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (data(50)[:, :2], "has shape (50, 2, 8, 8); the model takes"),
        (np.zeros((50, 3, 8, 8), dtype=np.int64), "has dtype int64; expected floats"),
    ],
    ids=["shape", "dtype"],
)
def test_wrong_shape_or_dtype_is_a_usage_error_naming_calibration(tmp_path, array, message):
    np.save(tmp_path / "d.npy", array)
    with pytest.raises(UsageError, match=re.escape(message)) as raised:
        read_calibration(tmp_path / "d.npy", SPECS, None)
    assert raised.value.params()[0] == Param("calibration")


def test_an_image_folder_is_read_with_the_preprocessing(tmp_path):
    x = np.clip(data(4), -1, 1)
    write_pngs(x, tmp_path / "images")
    arrays = read_calibration(tmp_path / "images", SPECS, PREPROCESS)
    assert arrays["x"].shape == (4, 3, 8, 8)
    np.testing.assert_allclose(arrays["x"], x, atol=1 / 255 + 1e-6)  # 8-bit pixels, mean 0.5, std 0.5


@pytest.mark.parametrize(
    ("make", "preprocess", "message"),
    [
        (lambda folder: None, PREPROCESS, "no input files in this folder"),
        (lambda folder: np.save(folder / "a.npy", data(2)), PREPROCESS, "holds no image files"),
        (lambda folder: write_pngs(data(2), folder), None, "needs a single-input model with image preprocessing"),
        (lambda folder: write_pngs(data(2), folder), Preprocess((4, 4), (0.5,), (0.5,)), "images of shape (3, 4, 4)"),
    ],
    ids=["empty", "arrays", "no-preprocessing", "wrong-size"],
)
def test_a_folder_that_gives_no_usable_images_is_a_usage_error(tmp_path, make, preprocess, message):
    folder = tmp_path / "images"
    folder.mkdir()
    make(folder)
    with pytest.raises(UsageError, match=re.escape(message)) as raised:
        read_calibration(folder, SPECS, preprocess)
    assert raised.value.params()[0] == Param("calibration")


def test_the_reader_gives_batches_of_one_size():
    x = data(20)
    dynamic = BatchReader({"x": x}, None)
    sizes = [len(b["x"]) for b in iter(dynamic.get_next, None)]
    assert sizes == [16, 16]  # one size: ONNX Runtime's histogram calibrators stack the batches
    assert [len(b["x"]) for b in iter(BatchReader({"x": x[:5]}, None).get_next, None)] == [5]
    static = BatchReader({"x": x}, 8)
    batches = list(iter(static.get_next, None))
    assert [len(b["x"]) for b in batches] == [8, 8, 8]
    np.testing.assert_array_equal(batches[-1]["x"][4:], np.repeat(x[-1:], 4, axis=0))  # padding repeats the last
