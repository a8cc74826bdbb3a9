"""The HTTP API called as an ASGI app with a stand-in for the replica (no Ray, no sockets)."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import numpy as np
import pytest
from tiny_onnx import image_classifier

import bnfold
from bnfold.on_ray.auth import token_digest
from bnfold.on_ray.http import ApiSettings, build_api

TOKEN = "a-token-of-enough-characters"
X = np.zeros((1, 1, 2, 2), dtype=np.float32)


class StandIn:
    """A replica without Ray: runs the predictor directly, or fails as told."""

    def __init__(self, predictor: bnfold.Predictor, failure: Exception | None = None) -> None:
        self.predictor = predictor
        self.failure = failure
        self.calls = 0

    async def infer(self, feeds):
        self.calls += 1
        if self.failure is not None:
            raise self.failure
        return self.predictor.run(feeds)

    def metadata(self):
        return {"model": "stand-in"}


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> bnfold.Predictor:
    return bnfold.Predictor(image_classifier(tmp_path_factory.mktemp("http") / "c.onnx"), device="cpu")


def call(app, method, path, *, headers=(), chunks=(b"",)):
    """(status, JSON body, body chunks the app read) of one request sent as ``chunks``."""
    sent, read = [], []
    pending = list(chunks)

    async def receive():
        chunk = pending.pop(0)
        read.append(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), read


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def api(predictor, *, token=None, limit=10_000, failure=None, body_timeout_s=30.0):
    service = StandIn(predictor, failure)
    settings = ApiSettings(limit, token_digest(token) if token else None, 2, body_timeout_s)
    return build_api(service, settings), service


def test_predict_answers_outputs_and_top_k(predictor):
    app, _ = api(predictor)
    status, body, _ = call(app, "POST", "/predict", chunks=[json.dumps({"inputs": X.tolist()}).encode()])
    assert status == 200
    np.testing.assert_allclose(body["outputs"], predictor.predict(X), rtol=1e-6)
    assert len(body["top_k"]) == 1 and len(body["top_k"][0]["indices"]) == 2


def test_without_the_token_nothing_is_read_or_run(predictor):
    app, service = api(predictor, token=TOKEN)
    for headers in ([], [("Authorization", "Bearer wrong-token-of-enough-chars")], [("Authorization", TOKEN)]):
        status, body, read = call(app, "POST", "/predict", headers=headers, chunks=[npy(X)])
        assert status == 401 and "bearer token" in body["error"] and read == []
        assert call(app, "GET", "/metadata", headers=headers)[0] == 401
    assert service.calls == 0
    assert call(app, "GET", "/health")[:2] == (200, {"status": "ok"})
    good = [("Authorization", f"Bearer {TOKEN}"), ("Content-Type", "application/x-npy")]
    assert call(app, "POST", "/predict", headers=good, chunks=[npy(X)])[0] == 200
    assert call(app, "GET", "/metadata", headers=good)[:2] == (200, {"model": "stand-in"})


def test_a_declared_length_over_the_limit_is_refused_before_reading(predictor):
    app, service = api(predictor, limit=100)
    status, body, read = call(app, "POST", "/predict", headers=[("Content-Length", "101")], chunks=[b"x" * 101])
    assert status == 413 and body["error"].startswith("request body too large: 101 bytes, the limit is 100")
    assert read == [] and service.calls == 0


def test_a_chunked_body_over_the_limit_is_refused_while_reading(predictor):
    app, service = api(predictor, limit=100)
    status, body, read = call(app, "POST", "/predict", chunks=[b"[" * 60, b"1" * 60, b"]" * 60])
    assert status == 413 and "limit is 100 bytes" in body["error"]
    assert len(read) == 2 and service.calls == 0


def test_a_body_decoding_to_more_elements_than_the_body_limit_is_413_before_it_is_decoded(predictor):
    app, service = api(predictor, limit=10_000)  # at most 10,000 bytes, decoding to 10,000 elements
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.zeros((25_000, 1, 2, 2), np.float32))  # 400 kB of zeros in 1 kB
    assert len(buffer.getvalue()) < 10_000
    npz = [("Content-Type", "application/x-npz")]
    status, body, _ = call(app, "POST", "/predict", headers=npz, chunks=[buffer.getvalue()])
    assert status == 413 and body["error"].startswith("request body: its arrays hold 100,000 values, more than")
    assert service.calls == 0


def test_a_body_not_received_in_time_is_408_and_the_connection_closed(predictor):
    app, service = api(predictor, body_timeout_s=0.2)
    sent = []

    async def stalls():  # a part of the body, then nothing
        if not sent:
            sent.append(b"{")
            return {"type": "http.request", "body": b"{", "more_body": True}
        await asyncio.Event().wait()

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": [], "query_string": b""}
    asyncio.run(asyncio.wait_for(app(scope, stalls, send), 10))
    start = next(m for m in sent if isinstance(m, dict) and m["type"] == "http.response.start")
    body = json.loads(b"".join(m.get("body", b"") for m in sent if isinstance(m, dict) and "body" in m))
    assert start["status"] == 408 and (b"connection", b"close") in start["headers"]
    assert body == {"error": "request body not received within 0.2 s"} and service.calls == 0


def test_an_unsupported_media_type_is_415(predictor):
    app, service = api(predictor)
    status, body, _ = call(app, "POST", "/predict", headers=[("Content-Type", "text/csv")], chunks=[b"1,2"])
    assert status == 415 and "unsupported Content-Type 'text/csv'" in body["error"] and service.calls == 0


def test_a_bad_input_is_400_with_one_line(predictor):
    app, _ = api(predictor)
    status, body, _ = call(app, "POST", "/predict", chunks=[b'{"inputs": [1, 2]}'])
    assert status == 400 and "expected shape Nx1x2x2, got 2" in body["error"] and "\n" not in body["error"]


def test_an_internal_error_is_500_with_the_traceback_only_in_the_log(predictor, caplog):
    app, _ = api(predictor, failure=RuntimeError("secret internals\nsecond line"))
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        status, body, _ = call(app, "POST", "/predict", chunks=[json.dumps({"inputs": X.tolist()}).encode()])
    assert status == 500 and body == {"error": "internal error; the server log has the traceback"}
    assert "secret internals" in caplog.text and "Traceback" in caplog.text


def test_routes_outside_the_api_do_not_exist(predictor):
    app, _ = api(predictor)
    for method, path in (("GET", "/docs"), ("GET", "/openapi.json"), ("POST", "/load"), ("GET", "/predict")):
        assert call(app, method, path)[0] in (404, 405), path


@pytest.mark.parametrize(
    ("method", "path", "status", "message"),
    [("GET", "/nope", 404, "Not Found: GET /nope"), ("GET", "/predict", 405, "Method Not Allowed: GET /predict")],
)
def test_unknown_paths_and_methods_answer_in_the_one_error_shape(predictor, method, path, status, message):
    app, _ = api(predictor)
    got, body, _ = call(app, method, path)
    assert got == status and list(body) == ["error"]
    assert body["error"].startswith(message) and "POST /predict, GET /metadata, GET /health" in body["error"]
