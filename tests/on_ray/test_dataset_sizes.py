"""`bnfold predict --ray` with a dynamic-size model: images and arrays of several sizes give one row
each (run in batches of one size), an output that follows the size is a flat list with its shape,
and a size the model does not take is that row's error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sized_models import halved, halving_onnx

from bnfold.on_ray import predict_dataset, write_predictions

RTOL = 1e-5


@pytest.fixture(scope="module")
def halving(tmp_path_factory) -> Path:
    return halving_onnx(tmp_path_factory.mktemp("ray-sizes") / "halving.onnx")


def rows_by_item(path: Path) -> dict[str, dict]:
    return {row["item"]: row for row in pq.read_table(path).to_pylist()}


def check_row(row: dict, x: np.ndarray) -> None:
    """A row holds the model's outputs for the one sample ``x`` ([1, H, W])."""
    y = halved(x[None])[0]
    assert row["error"] is None and row["output_y_shape"] == list(y.shape)
    np.testing.assert_allclose(np.reshape(row["output_y"], y.shape), y, rtol=RTOL)
    np.testing.assert_allclose(row["output_mean"], [x.mean()], rtol=RTOL)


def test_images_of_several_sizes_give_a_row_each_and_a_size_it_does_not_take_an_error(ray_cluster, halving, tmp_path):
    rng = np.random.default_rng(0)
    pixels = {f"{i}.png": rng.integers(0, 256, size, dtype=np.uint8) for i, size in enumerate([(4, 6), (8, 2), (4, 6)])}
    pixels["odd.png"] = rng.integers(0, 256, (5, 6), dtype=np.uint8)
    for name, image in pixels.items():
        Image.fromarray(image).save(tmp_path / name)
    out = tmp_path / "preds.parquet"
    summary = write_predictions(predict_dataset(halving, [str(tmp_path / "*.png")], batch_size=8), out)
    assert (summary.rows, summary.errors) == (4, 1)
    rows = rows_by_item(out)
    odd = rows.pop(str(tmp_path / "odd.png"))
    assert "image size 5x6 is not one the model takes: height 5" in odd["error"] and odd["output_y"] is None
    for name, row in rows.items():
        check_row(row, pixels[Path(name).name][None].astype(np.float32) / 255)


def test_array_files_of_several_sizes_give_a_row_per_sample(ray_cluster, halving, tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"a.npy": rng.standard_normal((3, 1, 4, 6)), "b.npy": rng.standard_normal((2, 1, 2, 8))}
    for name, x in arrays.items():
        np.save(tmp_path / name, x.astype(np.float32))
    out = tmp_path / "preds.parquet"
    write_predictions(predict_dataset(halving, [tmp_path / name for name in arrays], batch_size=8), out)
    rows = rows_by_item(out)
    assert len(rows) == 5
    for name, x in arrays.items():
        for i, sample in enumerate(x.astype(np.float32)):
            check_row(rows[f"{tmp_path / name}:{i}"], sample)
