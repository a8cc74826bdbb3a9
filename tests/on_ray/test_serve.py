"""`model_app` on a real local Ray Serve: answers equal the local Predictor, concurrent requests
share batches, bad requests get 4xx and the server keeps serving, tokens, a killed replica."""

from __future__ import annotations

import io
import os
import select
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import serve_fixtures
from listeners import listeners
from PIL import Image
from serve_fixtures import REQUEST_TIMEOUT_S, post_json, request
from tiny_onnx import two_in_two_out

import bnfold
from bnfold.metadata import Preprocess
from bnfold.on_ray.serve import model_app

ray_local = serve_fixtures.ray_local  # the session's Ray and Serve (not a conftest: see serve_fixtures)
serve_url = serve_fixtures.serve_url

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "sample_models" / "digits_cnn"
TOKEN = "test-token-0123456789abcdef"
# Tolerances of this test: a sample's outputs may differ slightly when ONNX Runtime runs it in a
# batch of another size; a wrong or another sample's answer differs by far more.
RTOL, ATOL = 1e-4, 1e-5
MAX_BATCH = 8
# Long enough that a request which waited for it is told from one that did not, on a busy machine.
BATCH_WAIT_MS = 1000
QUIET = {"log_level": "WARNING"}  # no access log lines


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory) -> Path:
    loaded = bnfold.load_model(DIGITS / "model.pt")
    out = tmp_path_factory.mktemp("serve") / "digits.onnx"
    steps = Preprocess(size=(8, 8), mean=(0.75,), std=(1.0,), channel_order="L", scale=2.5 / 255)
    labels = [f"digit {i}" for i in range(10)]
    bnfold.export(loaded.module, loaded.example_inputs(), out, verify=False, labels=labels, preprocess=steps)
    return out


@pytest.fixture(scope="module")
def local(digits_onnx) -> bnfold.Predictor:
    return bnfold.Predictor(digits_onnx, device="cpu")


@pytest.fixture(scope="module")
def digits(serve_url, digits_onnx) -> str:
    from ray import serve

    app = model_app(
        digits_onnx, cpus_per_replica=0.5, max_batch_size=MAX_BATCH, batch_wait_ms=BATCH_WAIT_MS, max_body_mb=0.25
    )
    serve.run(app, name="digits", route_prefix="/digits", logging_config=QUIET)
    return f"{serve_url}/digits"  # Serve's shutdown at the end of the module deletes it


@pytest.fixture(scope="module")
def test_x() -> np.ndarray:
    return np.load(DIGITS / "test.npz")["x"]


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_answers_equal_the_local_predictor_for_json_npy_and_images(digits, local, test_x, tmp_path):
    x = test_x[:5]
    expected = local.predict(x)
    status, body = post_json(f"{digits}/predict", {"inputs": x.tolist()})
    assert status == 200
    np.testing.assert_allclose(body["outputs"], expected, rtol=RTOL, atol=ATOL)
    top = [item["indices"][0] for item in body["top_k"]]
    assert top == expected.argmax(1).tolist()
    assert body["top_k"][0]["labels"][0] == f"digit {top[0]}" and len(body["top_k"][0]["indices"]) == 5

    status, body = request(f"{digits}/predict", npy(x), {"Content-Type": "application/x-npy"})
    assert status == 200
    np.testing.assert_allclose(body["outputs"], expected, rtol=RTOL, atol=ATOL)

    image = np.linspace(0, 255, 64).reshape(8, 8).astype(np.uint8)
    (tmp_path / "digit.png").write_bytes(png(image))
    status, body = request(f"{digits}/predict", png(image), {"Content-Type": "image/png"})
    assert status == 200
    np.testing.assert_allclose(body["outputs"], local.predict_images([tmp_path / "digit.png"]), rtol=RTOL, atol=ATOL)


def test_a_request_larger_than_the_max_batch_is_split_and_joined_in_order(digits, local, test_x):
    x = test_x[: 2 * MAX_BATCH + 3]
    status, body = request(f"{digits}/predict", npy(x), {"Content-Type": "application/x-npy"})
    assert status == 200
    np.testing.assert_allclose(body["outputs"], local.predict(x), rtol=RTOL, atol=ATOL)
    _, meta = request(f"{digits}/metadata")
    assert meta["batching"]["largest_run_rows"] <= MAX_BATCH


def test_a_large_request_behind_waiting_ones_is_split_batched_and_joined_in_order(digits, local, test_x):
    """Small requests first (one runs at once, the others wait in the batch window), then a
    request of several chunks, which goes through @serve.batch beside them."""
    headers = {"Content-Type": "application/x-npy"}
    small = [test_x[40 + i : 41 + i] for i in range(3)]
    big = test_x[: 2 * MAX_BATCH + 3]
    with ThreadPoolExecutor(4) as pool:
        waiting = [pool.submit(request, f"{digits}/predict", npy(x), headers) for x in small]
        time.sleep(BATCH_WAIT_MS / 1000 / 4)
        status, body = request(f"{digits}/predict", npy(big), headers)
        answers = [future.result() for future in waiting]
    assert status == 200, body
    np.testing.assert_allclose(body["outputs"], local.predict(big), rtol=RTOL, atol=ATOL)
    for x, (status, body) in zip(small, answers):
        assert status == 200, body
        np.testing.assert_allclose(body["outputs"], local.predict(x), rtol=RTOL, atol=ATOL)


def test_64_concurrent_clients_each_get_their_own_answer_from_shared_batches(digits, local, test_x):
    clients = 64
    start = threading.Barrier(clients)

    def client(i: int) -> tuple[int, dict]:
        start.wait(timeout=30)
        return post_json(f"{digits}/predict", {"inputs": test_x[i : i + 1].tolist()})

    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(client, range(clients)))
    expected = local.predict(test_x[:clients])
    for i, (status, body) in enumerate(answers):
        assert status == 200, body
        np.testing.assert_allclose(body["outputs"], expected[i : i + 1], rtol=RTOL, atol=ATOL)
    _, meta = request(f"{digits}/metadata")
    assert meta["batching"]["largest_run_chunks"] > 1


def test_a_request_alone_on_the_replica_does_not_wait_for_a_batch(digits, test_x):
    body, headers = npy(test_x[:1]), {"Content-Type": "application/x-npy"}
    request(f"{digits}/predict", body, headers)  # warm
    times = []
    for _ in range(3):
        started = time.perf_counter()
        status, _ = request(f"{digits}/predict", body, headers)
        times.append(time.perf_counter() - started)
        assert status == 200
    assert sorted(times)[1] < BATCH_WAIT_MS / 1000 / 2


STALLED_CLIENTS = 40  # more than a replica's body slots (32)


def test_clients_stalling_their_body_do_not_hold_up_the_others(digits, test_x):
    """Clients that send their headers and then no body: a normal client is still answered about
    as fast as before, and the stalled clients that give up their slot get a 408 and a closed
    connection (the others, 408 once the body time limit is over)."""
    body, headers = npy(test_x[:1]), {"Content-Type": "application/x-npy"}

    def latency() -> float:
        started = time.perf_counter()
        status, answer = request(f"{digits}/predict", body, headers)
        assert status == 200, answer
        return time.perf_counter() - started

    latency()  # warm
    baseline = statistics.median(latency() for _ in range(5))
    url = urlparse(digits)
    head = (
        f"POST {url.path}/predict HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/x-npy\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    stalled = [
        socket.create_connection((url.hostname, url.port), timeout=REQUEST_TIMEOUT_S) for _ in range(STALLED_CLIENTS)
    ]
    try:
        for client in stalled:
            client.sendall(head)
        loaded = statistics.median(latency() for _ in range(5))
        answered = []
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while not answered and time.monotonic() < deadline:  # the replies of the evicted ones are on their way
            answered, _, _ = select.select(stalled, [], [], deadline - time.monotonic())
        replies = [client.recv(100) for client in answered]
    finally:
        for client in stalled:
            client.close()
    assert loaded < max(4 * baseline, baseline + 1.0), (baseline, loaded)
    assert replies and all(reply.startswith(b"HTTP/1.1 408 ") for reply in replies), replies


BAD_REQUESTS = [
    ({"Content-Type": "application/json"}, b'{"inputs": [[1, 2, 3]]}', 400, "expected shape Nx1x8x8, got 1x3"),
    ({"Content-Type": "application/json"}, b'{"inputs": [[[1]], [[2, 3]]]}', 400, "not a rectangular nested list"),
    ({"Content-Type": "application/json"}, b"{no json", 400, "not valid JSON"),
    ({"Content-Type": "application/x-npy"}, npy(np.ones((1, 1, 8, 8), np.int32)), 400, "dtype int32"),
    ({"Content-Type": "application/x-npy"}, b"\x93NUMPY garbage", 400, "not a readable .npy/.npz file"),
    ({"Content-Type": "image/png"}, b"\x89PNG\r\n\x1a\n truncated", 400, "not a readable image"),
    ({"Content-Type": "text/csv"}, b"1,2,3", 415, "unsupported Content-Type"),
    ({"Content-Type": "application/x-npy"}, b"\0" * 300_000, 413, "request body too large"),
]


def test_each_bad_request_gets_its_4xx_and_the_next_good_one_succeeds(digits, local, test_x):
    good = test_x[7:8]
    for headers, body, status, message in BAD_REQUESTS:
        got, answer = request(f"{digits}/predict", body, headers)
        assert (got, message in answer.get("error", "")) == (status, True), answer
        assert "\n" not in answer["error"]
        got, answer = request(f"{digits}/predict", npy(good), {"Content-Type": "application/x-npy"})
        assert got == 200
        np.testing.assert_allclose(answer["outputs"], local.predict(good), rtol=RTOL, atol=ATOL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_every_port_of_the_local_ray_instance_listens_on_loopback_only(digits, serve_url):
    """GCS, raylet, workers, agents, metrics exporters, Serve's controller, proxy and replicas."""
    assert request(f"{digits}/health")[0] == 200
    sockets = listeners(os.getpid())
    assert any(s.port == urlparse(serve_url).port for s in sockets), sockets  # the listing sees Ray's processes
    assert len({s.pid for s in sockets}) >= 4, sockets
    assert [s for s in sockets if not s.loopback] == []


def test_metadata_and_health(digits, local):
    assert request(f"{digits}/health") == (200, {"status": "ok"})
    status, meta = request(f"{digits}/metadata")
    assert status == 200
    assert meta["inputs"][0]["shape"] == [None, 1, 8, 8] and meta["inputs"][0]["dtype"] == "float32"
    assert meta["outputs"][0]["shape"] == [None, 10] and meta["labels"] == local.labels
    assert meta["preprocessing"]["size"] == [8, 8] and meta["preprocessing"]["channel_order"] == "L"
    assert meta["device"] == {"device": "cpu", "providers": ["CPUExecutionProvider"], "threads": 1}
    assert meta["bnfold_version"] == bnfold.__version__ and meta["exported_with"] == bnfold.__version__
    assert meta["fold_report"]["folded"] == meta["fold_report"]["batch_norms"] > 0
    assert meta["weight_dtype"] == "float32" and meta["int8"] is None  # what bnfold inspect MODEL.onnx says
    assert meta["batching"]["max_batch_size"] == MAX_BATCH


@pytest.fixture(scope="module")
def pair_onnx(tmp_path_factory) -> Path:
    return two_in_two_out(tmp_path_factory.mktemp("serve") / "pair.onnx")


def pair_inputs(seed: int, rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, 3), dtype=np.float32), rng.standard_normal((rows, 3), dtype=np.float32)


def check_pair(body: dict, a: np.ndarray, b: np.ndarray) -> None:
    """The answer is exactly ``a + b`` and ``a * b`` (float32 arithmetic, any batch)."""
    assert set(body["outputs"]) == {"total", "product"}
    np.testing.assert_array_equal(np.asarray(body["outputs"]["total"], np.float32), a + b)
    np.testing.assert_array_equal(np.asarray(body["outputs"]["product"], np.float32), a * b)


def test_with_a_token_only_the_right_bearer_gets_in(serve_url, pair_onnx):
    from ray import serve

    app = model_app(pair_onnx, cpus_per_replica=0.5, token=TOKEN)
    serve.run(app, name="secured", route_prefix="/secured", logging_config=QUIET)
    url = f"{serve_url}/secured"
    a, b = pair_inputs(0, rows=2)
    payload = {"inputs": {"a": a.tolist(), "b": b.tolist()}}
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
        status, body = post_json(f"{url}/predict", payload, headers)
        assert status == 401 and "bearer token" in body["error"] and TOKEN not in body["error"]
        assert request(f"{url}/metadata", headers=headers)[0] == 401
    assert request(f"{url}/health")[0] == 200
    status, body = post_json(f"{url}/predict", payload, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    check_pair(body, a, b)


def test_a_replica_killed_under_load_is_replaced_and_no_answer_is_wrong(serve_url, pair_onnx, ray_local):
    from ray import serve

    app = model_app(pair_onnx, cpus_per_replica=0.5, max_batch_size=4)
    serve.run(app, name="restartable", route_prefix="/r", logging_config=QUIET)
    url = f"{serve_url}/r/predict"
    stop, failures, answers = threading.Event(), [], []

    def client(seed: int) -> None:
        while not stop.is_set():
            a, b = pair_inputs(seed := seed + 1000)
            status, body = post_json(url, {"inputs": {"a": a.tolist(), "b": b.tolist()}})
            if status == 200:
                check_pair(body, a, b)
                answers.append(time.monotonic())
            else:
                failures.append((status, body.get("error", "")[:200]))

    def answered_since(moment: float) -> int:
        return sum(t > moment for t in answers)

    def wait_for(condition, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not condition():
            time.sleep(0.1)

    with ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(client, seed) for seed in range(4)]
        try:
            wait_for(lambda: len(answers) >= 10, 60)
            assert len(answers) >= 10, f"no answers before the kill; failures {failures[:5]}"
            killed_at = time.monotonic()
            ray_local.kill(ray_local.get_actor(*_replica_actor(ray_local, "restartable")), no_restart=True)
            wait_for(lambda: answered_since(killed_at + 1) >= 20, 90)
        finally:
            stop.set()
            for done in clients:
                done.result(timeout=60)  # re-raises a wrong answer seen by a client
    assert answered_since(killed_at + 1) >= 20, f"too few answers after the kill; failures {failures[:5]}"
    assert all(status == 0 or status >= 500 for status, _ in failures), failures[:5]


def _replica_actor(ray, app: str) -> tuple[str, str]:
    """(name, namespace) of the Serve replica actor of application ``app``."""
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::{app}#"):
            return actor["name"], actor["namespace"]
    raise AssertionError(f"no replica actor for {app}")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"replicas": 0}, "`replicas` must be at least 1"),
        ({"replicas": (3, 2)}, "`replicas` must be at least 1, or \\(min, max\\)"),
        ({"max_batch_size": 0}, "`max_batch_size` must be positive"),
        ({"max_body_mb": 0}, "`max_body_mb` must be positive"),
        ({"body_timeout_s": 0}, "`body_timeout_s` must be positive"),
        ({"batch_wait_ms": -1}, "`batch_wait_ms` must not be negative"),
        ({"gpus_per_replica": -0.5}, "`gpus_per_replica` must not be negative"),
        ({"cpus_per_replica": 0}, "`cpus_per_replica` must be positive"),
        ({"top_k": 0}, "`top_k` must be at least 1"),
    ],
)
def test_model_app_refuses_bad_options_naming_the_parameter(pair_onnx, options, message):
    with pytest.raises(bnfold.UsageError, match=message):
        model_app(pair_onnx, **options)


def test_model_app_refuses_a_missing_model(tmp_path):
    with pytest.raises(bnfold.ModelLoadError, match=r"absent\.onnx does not exist"):
        model_app(tmp_path / "absent.onnx")
