"""predict_files: image and array files and folders, read as predict --ray reads them, predicted
in batches, one named row per sample; a mix of kinds, tables or unequal shapes refused by name."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import random_input, randomize_batchnorms, write_pngs
from torch import nn

import bnfold
from bnfold.metadata import Preprocess
from bnfold.predictor import Predictor, predict_files


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    net = randomize_batchnorms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 5)))
    path = tmp_path_factory.mktemp("f") / "m.onnx"
    preprocess = Preprocess(size=(6, 6), mean=(0.5,), std=(0.5,))
    return bnfold.export(net, (random_input(1, 3, 6, 6),), path, preprocess=preprocess).path


def samples(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 6, 6)).astype(np.float32)


def test_array_files_give_one_named_row_per_sample_in_batches(model, tmp_path):
    a, b = samples(5, 0), samples(2, 1)
    np.save(tmp_path / "a.npy", a)
    np.savez(tmp_path / "b.npz", x=b)
    predictor = Predictor(model, device="cpu", batch_size=3)  # 7 rows: batches of 3, 3, 1
    got = predict_files(predictor, [tmp_path / "a.npy", tmp_path / "b.npz"])
    assert got.names == [f"{tmp_path / 'a.npy'}:{i}" for i in range(5)] + [
        f"{tmp_path / 'b.npz'}:{i}" for i in range(2)
    ]
    (scores,) = got.outputs.values()
    np.testing.assert_array_equal(scores, predictor.predict(np.concatenate([a, b])))
    assert predict_files(predictor, [tmp_path / "a.npy"]).names == [str(i) for i in range(5)]


def test_a_folder_of_images_is_read_at_any_depth_with_the_stored_preprocessing(model, tmp_path):
    x = samples(4, 2)
    paths = write_pngs(x[:2], tmp_path / "imgs") + write_pngs(x[2:], tmp_path / "imgs" / "more")
    (tmp_path / "imgs" / ".hidden.png").write_bytes(paths[0].read_bytes())  # skipped, as on Ray
    predictor = Predictor(model, device="cpu")
    got = predict_files(predictor, [tmp_path / "imgs"])
    assert got.names == sorted(str(p) for p in paths)
    (scores,) = got.outputs.values()
    np.testing.assert_array_equal(scores, predictor.predict_images(sorted(paths)))


@pytest.mark.parametrize(
    ("make", "message"),
    [  # a folder that mixes kinds is named by its path; the rest by the parameter
        (lambda d: (np.save(d / "a.npy", samples(1, 0)), write_pngs(samples(1, 0), d / "i")), "/data mixes arrays"),
        (lambda d: (d / "t.parquet").write_bytes(b"PAR1"), "^`data`: parquet files are read on Ray Data"),
        (
            lambda d: (np.save(d / "a.npy", samples(1, 0)), np.save(d / "b.npy", np.zeros((1, 3, 7, 7)))),
            "^`data`: samples of input .* predict files of one shape at a time",
        ),
    ],
    ids=["mixed", "parquet", "unequal-shapes"],
)
def test_what_cannot_be_predicted_together_is_a_usage_error_naming_data(model, tmp_path, make, message):
    (tmp_path / "data").mkdir()
    make(tmp_path / "data")
    with pytest.raises(bnfold.UsageError, match=message):
        predict_files(Predictor(model, device="cpu"), [tmp_path / "data"])
