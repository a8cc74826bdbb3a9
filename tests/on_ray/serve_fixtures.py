"""Local Ray and Ray Serve for the serving tests: one Ray instance per test session (2 CPUs,
no token auth, session files in a short temporary folder), Serve listening on a free
loopback port for a test module, and HTTP helpers with bounded timeouts."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from bnfold.on_ray.cluster import ray_instance

REQUEST_TIMEOUT_S = 30


def free_port() -> int:
    """A TCP port nothing listens on at this moment (loopback)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local() -> Iterator[Any]:
    """Ray for the session; its session files in a short temporary folder (Ray's socket paths
    must stay under 107 characters, which pytest's deep temporary paths can exceed)."""
    folder = tempfile.mkdtemp(prefix="bnfold-ray-")
    try:
        with ray_instance(num_cpus=2, temp_dir=folder, token_auth=False) as ray:
            yield ray
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def serve_url(ray_local) -> Iterator[str]:
    """The base URL of Ray Serve's HTTP proxy; Serve and every application deployed on it are
    shut down at the end of the test module (idle replicas still cost CPU time)."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def request(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None, method: str | None = None
) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON answer) of one request; error statuses are returned, not raised, and a
    connection that failed or broke is status 0."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            return exc.code, json.loads(text)
        except ValueError:
            return exc.code, {"error": text.decode(errors="replace")}
    except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as exc:
        return 0, {"error": f"{type(exc).__name__}: {exc}"}


def post_json(url: str, payload: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    return request(url, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})
