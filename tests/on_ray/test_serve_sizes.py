"""`bnfold serve` of a dynamic-size model on a real local Ray Serve: concurrent requests of three
sizes each get their own answer, batched with requests of their own size; a size the model does
not take is a 400 naming the allowed sizes, and the server keeps serving."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import serve_fixtures
from helpers import random_input
from serve_fixtures import request
from sized_models import UNetLike, model

import bnfold
from bnfold.on_ray.serve import model_app

ray_local = serve_fixtures.ray_local  # the session's Ray and Serve (not a conftest: see serve_fixtures)
serve_url = serve_fixtures.serve_url

# Tolerances of this test: a sample's outputs may differ slightly when ONNX Runtime runs it in a
# batch of another size; a wrong or another sample's answer differs by far more.
RTOL, ATOL = 1e-4, 1e-5
SIZES = [(16, 24), (32, 32), (24, 40)]  # multiples of 8, the model's stride
PER_SIZE = 4
NPY = {"Content-Type": "application/x-npy"}


@pytest.fixture(scope="module")
def unet_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve-sizes") / "unet.onnx"
    bnfold.export(model(UNetLike), (random_input(1, 3, 32, 32),), path, dynamic_size=True, verify=False)
    return path


@pytest.fixture(scope="module")
def unet(serve_url, unet_onnx) -> str:
    from ray import serve

    app = model_app(unet_onnx, cpus_per_replica=0.5, max_batch_size=8, batch_wait_ms=200)
    serve.run(app, name="sized", route_prefix="/sized", logging_config={"log_level": "WARNING"})
    return f"{serve_url}/sized"


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_concurrent_requests_of_three_sizes_are_answered_each_batched_with_its_own_size(unet, unet_onnx):
    inputs = [random_input(1, 3, h, w, seed=i).numpy() for i, (h, w) in enumerate(SIZES * PER_SIZE)]
    start = threading.Barrier(len(inputs))

    def client(x: np.ndarray) -> tuple[int, dict]:
        start.wait(timeout=30)
        return request(f"{unet}/predict", npy(x), NPY)

    with ThreadPoolExecutor(len(inputs)) as pool:
        answers = list(pool.map(client, inputs))
    local = bnfold.Predictor(unet_onnx, device="cpu")
    for x, (status, body) in zip(inputs, answers):
        assert status == 200, body  # a run mixing sizes could not concatenate its inputs: a 500
        np.testing.assert_allclose(body["outputs"], local.predict(x), rtol=RTOL, atol=ATOL)
    _, meta = request(f"{unet}/metadata")
    batching = meta["batching"]
    assert batching["largest_run_chunks"] > 1 and len(SIZES) <= batching["runs"] < len(inputs)
    assert meta["image_sizes"]["x"]["height"] == {"min": 16, "multiple_of": 8, "max": None}


def test_a_size_the_model_does_not_take_is_a_400_naming_the_allowed_sizes_and_serving_goes_on(unet, unet_onnx):
    status, body = request(f"{unet}/predict", npy(random_input(1, 3, 20, 32).numpy()), NPY)
    assert status == 400
    assert body["error"] == (
        "input 'x': image size 20x32 is not one the model takes: height 20: expected a multiple of 8, "
        "at least 16 (nearest: 16 or 24)"
    )
    x = random_input(2, 3, 40, 16).numpy()
    status, body = request(f"{unet}/predict", npy(x), NPY)
    assert status == 200
    local = bnfold.Predictor(unet_onnx, device="cpu")
    np.testing.assert_allclose(body["outputs"], local.predict(x), rtol=RTOL, atol=ATOL)
