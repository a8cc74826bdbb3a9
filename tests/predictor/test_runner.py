"""Predictor on the CPU: shapes, dtypes, batching, dict I/O, threads, torch tensors."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from helpers import random_input, randomize_batchnorms
from torch import nn

import bnfold
from bnfold.batching import run_in_batches
from bnfold.predictor import Predictor


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, y):
        z = self.bn(self.conv(x))
        return z.mean((2, 3)) + y, z.amax((2, 3))


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> str:
    model = randomize_batchnorms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 5)))
    path = tmp_path_factory.mktemp("p") / "m.onnx"
    return bnfold.export(model, (random_input(1, 3, 6, 6),), path).path


def test_numpy_in_numpy_out_and_float64_is_cast(single):
    p = Predictor(single, device="cpu")
    assert p.device == "cpu" and p.providers == ["CPUExecutionProvider"]
    x = np.random.default_rng(0).standard_normal((7, 3, 6, 6))
    out = p.predict(x)
    assert out.shape == (7, 5) and out.dtype == np.float32
    np.testing.assert_array_equal(out, p.predict(x.astype(np.float32)))


def test_splitting_gives_the_same_result_in_order(single):
    x = np.random.default_rng(1).standard_normal((10, 3, 6, 6)).astype(np.float32)
    whole = Predictor(single, device="cpu").predict(x)
    chunked = Predictor(single, device="cpu", batch_size=3).predict(x)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "x, match",
    [
        (np.zeros((2, 3, 6, 6), np.int64), "dtype int64"),
        (np.zeros((2, 4, 6, 6), np.float32), "expected shape Nx3x6x6"),
        (np.zeros((3, 6, 6), np.float32), "got 3x6x6"),
    ],
    ids=["int", "channels", "rank"],
)
def test_bad_inputs_name_the_input(single, x, match):
    with pytest.raises(bnfold.UsageError, match=f"input 'input'.*{match}"):
        Predictor(single, device="cpu").predict(x)


def test_several_inputs_and_outputs_use_dicts(tmp_path):
    model = randomize_batchnorms(TwoHeads())
    path = bnfold.export(model, (random_input(1, 3, 5, 5), random_input(1, 4)), tmp_path / "m.onnx").path
    p = Predictor(path, device="cpu")
    out = p.predict({"x": random_input(2, 3, 5, 5).numpy(), "y": random_input(2, 4).numpy()})
    assert set(out) == {"output_0", "output_1"} and out["output_0"].shape == (2, 4)
    with pytest.raises(bnfold.UsageError, match="missing"):
        p.predict({"x": random_input(2, 3, 5, 5).numpy()})


def test_predict_is_thread_safe(single):
    p = Predictor(single, device="cpu")
    batches = [np.random.default_rng(i).standard_normal((4, 3, 6, 6)).astype(np.float32) for i in range(8)]
    expected = [p.predict(b) for b in batches]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(20):
            results[i] = p.predict(batches[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        np.testing.assert_array_equal(results[i], expected[i])


def test_unknown_device_is_a_usage_error(single):
    with pytest.raises(bnfold.UsageError, match="`device` must be one of 'auto', 'cuda', 'cpu' \\(got 'tpu'\\)"):
        Predictor(single, device="tpu")


def test_batch_size_below_one_is_a_usage_error(single):
    with pytest.raises(bnfold.UsageError, match=r"`batch_size` must be at least 1 \(got 0\)"):
        Predictor(single, device="cpu", batch_size=0)


def test_torch_tensors_on_the_cpu(single):
    p = Predictor(single, device="cpu")
    x = random_input(3, 3, 6, 6)
    expected = p.predict(x.numpy())
    np.testing.assert_array_equal(p.predict(x), expected)
    out = p.predict(x, as_torch=True)
    assert isinstance(out, torch.Tensor) and torch.equal(out, torch.from_numpy(expected))
    with pytest.raises(bnfold.UsageError, match="expected shape"):
        p.predict(random_input(3, 4, 6, 6))


def test_predict_batches_streams_in_order(single):
    p = Predictor(single, device="cpu")
    batches = [np.random.default_rng(i).standard_normal((2, 3, 6, 6)).astype(np.float32) for i in range(3)]
    for got, batch in zip(p.predict_batches(iter(batches)), batches):
        np.testing.assert_array_equal(got, p.predict(batch))


def test_static_batch_axis_is_padded_and_split(tmp_path):
    model = randomize_batchnorms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    path = bnfold.export(model, (random_input(4, 3, 6, 6),), tmp_path / "m.onnx", dynamic_batch=False).path
    p = Predictor(path, device="cpu")
    assert p.static_batch == 4
    x = np.random.default_rng(2).standard_normal((10, 3, 6, 6)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(p.predict(x), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(p.predict(x[:3]), expected[:3], rtol=1e-4, atol=1e-5)  # one padded chunk
    with pytest.raises(bnfold.errors.UsageError, match="empty input"):
        p.predict(x[:0])


@pytest.mark.parametrize("static_batch", [True, False], ids=["static-batch", "batch_size"])
def test_torch_tensors_are_chunked_and_padded_like_arrays(tmp_path, static_batch):
    """The chunking the CUDA I/O-binding path uses, on torch tensors: every run gets the static
    batch (the last chunk padded) or at most batch_size rows; outputs joined in order."""
    model = randomize_batchnorms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    example = random_input(4 if static_batch else 1, 3, 6, 6)
    path = bnfold.export(model, (example,), tmp_path / "m.onnx", dynamic_batch=not static_batch).path
    p = Predictor(path, device="cpu", batch_size=None if static_batch else 3)
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((10, 3, 6, 6)).astype(np.float32))
    rows: list[int] = []

    def run(part):
        (t,) = part.values()
        assert isinstance(t, torch.Tensor)
        rows.append(t.shape[0])
        return [torch.from_numpy(o) for o in p.run({p.inputs[0].name: t.numpy()})]

    (out,) = run_in_batches({p.inputs[0].name: x}, p.batch_plan(len(x)), run, torch.cat)
    assert rows == ([4, 4, 4] if static_batch else [3, 3, 3, 1])
    with torch.no_grad():
        np.testing.assert_allclose(out.numpy(), model.eval()(x).numpy(), rtol=1e-4, atol=1e-5)
