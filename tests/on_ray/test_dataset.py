"""Ray Data batch inference: the same results as the local Predictor, one row per item, a row
with its error for a file that cannot be read, and the job's preconditions checked before it
starts."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import umask, write_pngs
from torch import nn

import bnfold
from bnfold.on_ray import predict_dataset, write_predictions

# Scores of the same model on the same inputs, in batches of other sizes and other thread counts.
SCORE_RTOL, SCORE_ATOL = 1e-5, 1e-5


def rows_of(path: Path) -> dict[str, dict]:
    """The written rows by item."""
    rows = pq.read_table(path).to_pylist()
    by_item = {row["item"]: row for row in rows}
    assert len(by_item) == len(rows), "an item appears twice"
    return by_item


def assert_top_k_matches(rows: list[dict], scores: np.ndarray, labels: list[str], k: int) -> None:
    """The rows' top-k (indices, scores, labels) are those of the local ``scores``, row by row."""
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    assert [row["top_k_indices"] for row in rows] == expected.tolist()
    got = np.array([row["top_k_scores"] for row in rows])
    np.testing.assert_allclose(got, np.take_along_axis(scores, expected, 1), rtol=SCORE_RTOL, atol=SCORE_ATOL)
    assert [row["top_k_labels"] for row in rows] == [[labels[j] for j in idx] for idx in expected]
    assert all(row["error"] is None for row in rows)


def test_image_folder_with_a_corrupt_file_equals_the_local_predictor(ray_cluster, shapes_onnx, shapes_x, tmp_path):
    paths = write_pngs(shapes_x[:10], tmp_path / "images")
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "preds.parquet"
    summary = write_predictions(predict_dataset(shapes_onnx, tmp_path / "images", batch_size=4, top_k=3), out)
    assert (summary.rows, summary.errors) == (11, 1)
    rows = rows_of(out)
    broken = rows.pop(str(tmp_path / "images" / "broken.png"))
    assert broken["error"].endswith("broken.png: not a readable image (cannot identify the image format)")
    assert broken["top_k_indices"] is None and broken["top_k_scores"] is None and broken["top_k_labels"] is None
    local = bnfold.Predictor(shapes_onnx, device="cpu")
    assert sorted(rows) == [str(p) for p in paths]
    assert_top_k_matches([rows[str(p)] for p in paths], local.predict_images(paths), local.labels, 3)


def test_npz_and_npy_files_give_one_row_per_sample_named_file_and_row(ray_cluster, shapes_onnx, shapes_x, tmp_path):
    np.savez(tmp_path / "a.npz", x=shapes_x[:15], y=np.zeros(15))
    np.save(tmp_path / "b.npy", shapes_x[15:].astype(np.float64))
    out = tmp_path / "preds.parquet"
    inputs = [tmp_path / "a.npz", tmp_path / "b.npy"]
    with umask(0o027):
        write_predictions(predict_dataset(shapes_onnx, inputs, batch_size=8, top_k=2, actors=(1, 1)), out)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o750  # a folder made under the umask, not mkdtemp's 0700
    rows = rows_of(out)
    items = [f"{tmp_path / 'a.npz'}:{i}" for i in range(15)] + [f"{tmp_path / 'b.npy'}:{i}" for i in range(9)]
    assert sorted(rows) == sorted(items)
    local = bnfold.Predictor(shapes_onnx, device="cpu")
    assert_top_k_matches([rows[item] for item in items], local.predict(shapes_x), local.labels, 2)


class TwoOutputs(nn.Module):
    """Not a classifier: a feature map and a per-sample scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y, y.mean((1, 2, 3))


def test_a_dataset_of_tensors_gives_the_raw_outputs_of_each_item(ray_cluster, tmp_path):
    import ray.data

    model = bnfold.export(TwoOutputs().eval(), (torch.randn(1, 3, 5, 5),), tmp_path / "two.onnx", verify=False).path
    x = np.random.default_rng(0).standard_normal((6, 3, 5, 5)).astype(np.float32)
    dataset = ray.data.from_items([{"item": f"s{i}", "data": x[i]} for i in range(6)])
    out = tmp_path / "raw.parquet"
    write_predictions(predict_dataset(model, dataset, batch_size=4), out)
    table = pq.read_table(out)
    local = bnfold.Predictor(model, device="cpu").predict({"x": x})
    first, second = (f"output_{spec.name}" for spec in bnfold.Predictor(model, device="cpu").outputs)
    assert table.column_names == ["item", first, second, "error"]
    order = np.argsort(table.column("item").to_pylist())
    maps = table.column(first).combine_chunks().to_numpy_ndarray()[order]
    assert maps.shape == (6, 2, 5, 5)
    np.testing.assert_allclose(maps, next(iter(local.values())), rtol=SCORE_RTOL, atol=SCORE_ATOL)
    np.testing.assert_allclose(
        table.column(second).to_numpy()[order], list(local.values())[1], rtol=SCORE_RTOL, atol=SCORE_ATOL
    )


def test_a_file_of_the_wrong_shape_among_good_ones_is_a_row_per_sample_with_its_error(
    ray_cluster, shapes_onnx, shapes_x, tmp_path
):
    np.save(tmp_path / "a.npy", shapes_x[:6])
    np.save(tmp_path / "b.npy", np.zeros((2, 3, 8, 8), np.float32))
    out = tmp_path / "preds.parquet"
    summary = write_predictions(predict_dataset(shapes_onnx, sorted(tmp_path.glob("*.npy")), batch_size=8), out)
    rows = rows_of(out)
    assert (summary.rows, summary.errors) == (8, 2)
    for i in range(2):
        assert rows[f"{tmp_path / 'b.npy'}:{i}"]["error"] == "input 'x': expected shape Nx3x16x16, got 1x3x8x8"
    assert all(rows[f"{tmp_path / 'a.npy'}:{i}"]["error"] is None for i in range(6))


def test_a_corrupt_first_file_is_a_row_with_its_error_and_the_job_goes_on(ray_cluster, shapes_onnx, shapes_x, tmp_path):
    (tmp_path / "a.npy").write_bytes(b"not an array")  # the first file read, by the check too
    np.save(tmp_path / "b.npy", shapes_x[:3])
    predictions = predict_dataset(shapes_onnx, tmp_path)
    summary = write_predictions(predictions, tmp_path / "p.parquet")
    rows = rows_of(tmp_path / "p.parquet")
    assert (summary.rows, summary.errors) == (4, 1)
    assert rows[str(tmp_path / "a.npy")]["error"].startswith(str(tmp_path / "a.npy"))


# What would fail every row fails before the job, with the Predictor's errors.
def _wrong_shape(tmp_path: Path, model: Path) -> tuple[object, ...]:
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 8, 8), np.float32))
    return model, tmp_path / "x.npy"


def _no_preprocessing(tmp_path: Path, model: Path) -> tuple[object, ...]:
    loaded = bnfold.load_model(Path(__file__).parents[2] / "sample_models" / "shapes_resnet" / "model.pt2")
    bare = bnfold.export(loaded.module, loaded.example_inputs(), tmp_path / "bare.onnx", verify=False).path
    write_pngs(np.zeros((1, 3, 16, 16), np.float32), tmp_path / "images")
    return bare, tmp_path / "images"


PRECONDITIONS = {
    "wrong-shape": (_wrong_shape, {}, bnfold.UsageError, r"^input 'x': expected shape Nx3x16x16, got 1x3x8x8$"),
    "no-preprocessing": (
        _no_preprocessing,
        {},
        bnfold.UsageError,
        r"has no preprocessing metadata, so it cannot read images: export it with image preprocessing",
    ),
    "missing-model": (lambda t, m: (t / "nope.onnx", t), {}, bnfold.ModelLoadError, "does not exist"),
    "int-arrays": (
        lambda t, m: (m, (t / "i.npy", np.save(t / "i.npy", np.zeros((2, 3, 16, 16), np.int64)))[0]),
        {},
        bnfold.UsageError,
        "has dtype int64; expected floats",
    ),
    "top-k": (_wrong_shape, {"top_k": 0}, bnfold.UsageError, r"`top_k` must be at least 1 \(got 0\)"),
    "batch-size": (_wrong_shape, {"batch_size": 0}, bnfold.UsageError, r"`batch_size` must be at least 1"),
    "actors": (_wrong_shape, {"actors": (2, 1)}, bnfold.UsageError, r"`actors` must be .*\(got \(2, 1\)\)"),
    "gpus": (_wrong_shape, {"gpus_per_actor": 1}, bnfold.BnfoldError, r"no node of the Ray cluster has .* 1 GPU"),
    "cpus": (_wrong_shape, {"cpus_per_actor": 64}, bnfold.BnfoldError, r"lower `cpus_per_actor`"),
    "no-files-found": (
        lambda t, m: (m, f"local://{(t / 'd', (t / 'd').mkdir(), (t / 'd' / 'a.txt').write_text('a'))[0]}"),
        {},
        bnfold.UsageError,
        r"^`data` local://.*: No input files found to read with the following file extensions",
    ),
    "mixed-kinds": (
        lambda t, m: (m, [_wrong_shape(t, m)[1], write_pngs(np.zeros((1, 3, 4, 4)), t / "i")[0]]),
        {},
        bnfold.UsageError,
        r"^`data` mixes arrays \(.*\.npy\) and images \(.*\.png\): predict one kind of input at a time$",
    ),
}


@pytest.mark.parametrize("case", list(PRECONDITIONS), ids=list(PRECONDITIONS))
def test_what_would_fail_every_row_fails_before_the_job(case, ray_cluster, shapes_onnx, tmp_path):
    make, kwargs, error, match = PRECONDITIONS[case]
    model, data = make(tmp_path, shapes_onnx)
    with pytest.raises(error, match=match):
        predict_dataset(model, data, **kwargs)


def test_a_dataset_without_item_names_is_refused(ray_cluster, shapes_onnx, shapes_x):
    import ray.data

    with pytest.raises(bnfold.UsageError, match="no 'item' or 'path' column"):
        predict_dataset(shapes_onnx, ray.data.from_items([{"data": shapes_x[0]}]))


def test_a_file_gone_after_listing_is_a_row_with_its_error(ray_cluster, shapes_onnx, shapes_x, tmp_path):
    np.save(tmp_path / "a.npy", shapes_x[:3])
    np.save(tmp_path / "b.npy", shapes_x[3:5])
    predictions = predict_dataset(shapes_onnx, tmp_path)  # Ray lists the files now
    (tmp_path / "b.npy").unlink()
    summary = write_predictions(predictions, tmp_path / "p.parquet")
    rows = rows_of(tmp_path / "p.parquet")
    assert (summary.rows, summary.errors) == (4, 1)
    assert rows[str(tmp_path / "b.npy")]["error"].startswith(f"{tmp_path / 'b.npy'}: cannot read it (")


def test_an_existing_output_is_refused_and_an_interrupted_job_leaves_nothing(
    ray_cluster, shapes_onnx, shapes_x, tmp_path, monkeypatch
):
    np.save(tmp_path / "a.npy", shapes_x[:4])
    predictions = predict_dataset(shapes_onnx, tmp_path / "a.npy")
    (tmp_path / "taken.parquet").mkdir()
    with pytest.raises(bnfold.UsageError, match=r"taken.parquet exists; remove it or choose another `path`"):
        write_predictions(predictions, tmp_path / "taken.parquet")
    with pytest.raises(bnfold.UsageError, match="does not exist"):
        write_predictions(predictions, tmp_path / "missing" / "p.parquet")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("bnfold.on_ray.dataset.pads.dataset", interrupted)  # Ctrl-C once the files are written
    with pytest.raises(KeyboardInterrupt):
        write_predictions(predictions, tmp_path / "p.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "taken.parquet"]


def test_rows_of_another_shape_in_a_dataset_fail_alone(ray_cluster, shapes_onnx, shapes_x, tmp_path):
    import ray.data

    samples = [shapes_x[0], shapes_x[1], np.zeros((3, 8, 8), np.float32), shapes_x[2]]
    dataset = ray.data.from_items([{"item": f"s{i}", "data": x} for i, x in enumerate(samples)])
    write_predictions(predict_dataset(shapes_onnx, dataset, batch_size=4, top_k=1), tmp_path / "p.parquet")
    rows = rows_of(tmp_path / "p.parquet")
    assert rows["s2"]["error"] == "input 'x': expected shape Nx3x16x16, got 1x3x8x8"
    local = bnfold.Predictor(shapes_onnx, device="cpu").predict(shapes_x[:3])
    assert [rows[f"s{i}"]["top_k_indices"] for i in (0, 1, 3)] == local.argmax(1)[:, None].tolist()
