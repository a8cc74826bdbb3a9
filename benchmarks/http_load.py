"""HTTP load for `benchmarks/serve_throughput.py`, in a process of its own like a real client.

    python benchmarks/http_load.py PORT CLIENTS npy|json SECONDS

CLIENTS threads each send one-item `POST /predict` requests (3x224x224 float32, as `.npy` or
JSON, encoded before the clock starts) over a keep-alive connection for SECONDS; prints one JSON
object: items/s, p50/p99 latency (ms), requests, the body's size (MB) and the median ms to encode
one body.
"""

from __future__ import annotations

import http.client
import io
import json
import statistics
import sys
import threading
import time

import numpy as np

SHAPE = (3, 224, 224)
POOL = 16  # distinct request bodies, cycled


def bodies(kind: str) -> tuple[list[bytes], str, float]:
    """POOL request bodies of one item each, their Content-Type, and the median ms to encode one."""
    rng = np.random.default_rng(1)
    out, costs = [], []
    for _ in range(POOL):
        x = rng.standard_normal((1, *SHAPE), dtype=np.float32)
        t0 = time.perf_counter()
        if kind == "npy":
            buffer = io.BytesIO()
            np.save(buffer, x)
            out.append(buffer.getvalue())
        else:
            out.append(json.dumps({"inputs": x.tolist()}).encode())
        costs.append(time.perf_counter() - t0)
    return out, "application/x-npy" if kind == "npy" else "application/json", statistics.median(costs) * 1e3


def load(port: int, clients: int, payloads: list[bytes], content_type: str, seconds: float) -> dict[str, float]:
    """Items/s and latency percentiles of ``clients`` threads sending single-item requests."""
    latencies: list[float] = []
    errors: list[str] = []
    start = threading.Barrier(clients + 1)
    deadline: list[float] = []

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        headers = {"Content-Type": content_type}
        mine = []
        start.wait()
        i = index
        while time.perf_counter() < deadline[0]:
            t0 = time.perf_counter()
            connection.request("POST", "/predict", payloads[i % len(payloads)], headers)
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                errors.append(f"{response.status} {body[:200]!r}")
                break
            mine.append(time.perf_counter() - t0)
            i += clients
        latencies.extend(mine)
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    deadline.append(began + seconds)
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed, e.g. {errors[0]}")
    ordered = sorted(latencies)
    return {
        "items_per_s": len(ordered) / elapsed,
        "p50_ms": ordered[len(ordered) // 2] * 1e3,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3,
        "requests": len(ordered),
    }


def main() -> None:
    port, clients, kind, seconds = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    payloads, content_type, encode_ms = bodies(kind)
    figures = load(port, clients, payloads, content_type, seconds)
    figures.update(encode_ms=encode_ms, body_mb=len(payloads[0]) / 1e6)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
