"""`bnfold serve` (Ray Serve, dynamic batching) against `Predictor.predict` on the same cores.

    python benchmarks/serve_throughput.py                  # from the repository root
    python benchmarks/serve_throughput.py --gpus-per-replica 1   # on a GPU machine

A ResNet-18-shaped model (3x224x224, random weights and batch-norm statistics) is exported with
bnfold and served by `model_app` on a local Ray instance with all the CPUs (one replica, its ONNX
Runtime threads = those CPUs). For each body type (`.npy`, JSON; encoded before the clock starts,
the client's encoding cost is reported separately) and each number of concurrent clients (1, 8,
32 threads of a client process, `benchmarks/http_load.py`, each sending one item per request over
a keep-alive connection), and
just before that case (the shared machine's speed drifts), the same cores run, in this process
while the replica idles:

1. `Predictor.predict` on one item at a time, in a loop (the latency floor);
2. `Predictor.predict` on whole batches of `--max-batch-size` items (the compute ceiling).

Served throughput is compared with the ceiling, served p50 latency with the single-item loop.
Goals (issue 14): with `.npy` bodies, 32 clients >= 0.6x the ceiling and 1 client p50 <= the
single-item latency + 15 ms; on a GPU, 32 clients >= 3x the single-item loop.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from models import resnet18

import bnfold
from bnfold.on_ray.cluster import ray_instance
from bnfold.on_ray.serve import model_app

SHAPE = (3, 224, 224)


def export_model(folder: Path) -> Path:
    return Path(bnfold.export(resnet18(), (torch.randn(1, *SHAPE),), folder / "resnet18.onnx", verify=False).path)


def direct(predictor: bnfold.Predictor, max_batch: int, seconds: float) -> dict[str, float]:
    """Items/s and per-call latency of Predictor.predict: single items in a loop, whole batches."""
    x = np.random.default_rng(0).standard_normal((max_batch, *SHAPE), dtype=np.float32)
    figures = {}
    for name, batch in (("single", x[:1]), ("batch", x)):
        for _ in range(3):
            predictor.predict(batch)
        times, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            predictor.predict(batch)
            times.append(time.perf_counter() - t0)
        figures[f"{name}_items_per_s"] = len(batch) * len(times) / sum(times)
        figures[f"{name}_p50_ms"] = statistics.median(times) * 1e3
    return figures


def load(port: int, clients: int, kind: str, seconds: float) -> dict[str, float]:
    """``benchmarks/http_load.py``'s figures for ``clients`` clients in a process of their own (as
    real clients are: not sharing the GIL with this process's Ray driver)."""
    command = [sys.executable, str(ROOT / "benchmarks" / "http_load.py"), str(port), str(clients), kind, str(seconds)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the load generator failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def batching(port: int) -> dict[str, int]:
    """The replica's batching counters (``/metadata``)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", "/metadata")
    counters = json.loads(connection.getresponse().read())["batching"]
    connection.close()
    return counters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="Measured seconds per case.")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--bodies", default="npy,json")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--gpus-per-replica", type=float, default=0.0)
    parser.add_argument("--json", dest="json_path", help="Also write the figures here.")
    args = parser.parse_args()
    device = "cuda" if args.gpus_per_replica else "cpu"
    cpus = os.cpu_count() or 1
    results: dict[str, object] = {"cpus": cpus, "device": device, "max_batch_size": args.max_batch_size}
    print(f"{cpus} CPUs, device {device}; max batch {args.max_batch_size}, batch wait {args.batch_wait_ms} ms")
    with tempfile.TemporaryDirectory() as tmp:
        path = export_model(Path(tmp))
        predictor = bnfold.Predictor(path, device=device)
        port = 18000 + os.getpid() % 1000
        with ray_instance(num_cpus=cpus, token_auth=False):
            from ray import serve

            serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
            app = model_app(
                path,
                cpus_per_replica=cpus,
                gpus_per_replica=args.gpus_per_replica,
                max_batch_size=args.max_batch_size,
                batch_wait_ms=args.batch_wait_ms,
            )
            serve.run(app, name="bench", route_prefix="/", logging_config={"log_level": "WARNING"})
            print(
                "| body | clients | items/s | ceiling items/s | x ceiling | single-loop items/s | x single loop "
                "| p50 ms | p99 ms | single p50 ms | p50 - single ms | rows per ORT run |"
            )
            print("|---|---|---|---|---|---|---|---|---|---|---|---|")
            for kind in args.bodies.split(","):
                load(port, 4, kind, 2.0)  # warm-up
                for clients in map(int, args.clients.split(",")):
                    base = direct(predictor, args.max_batch_size, args.seconds / 3)
                    before = batching(port)
                    got = load(port, clients, kind, args.seconds)
                    after = batching(port)
                    got.update(base)
                    got["rows_per_run"] = (after["rows"] - before["rows"]) / max(1, after["runs"] - before["runs"])
                    results[f"{kind}_{clients}"] = got
                    print(
                        f"| {kind} ({got['body_mb']:.1f} MB, encode {got['encode_ms']:.0f} ms) | {clients} "
                        f"| {got['items_per_s']:.1f} | {base['batch_items_per_s']:.1f} "
                        f"| {got['items_per_s'] / base['batch_items_per_s']:.2f} | {base['single_items_per_s']:.1f} "
                        f"| {got['items_per_s'] / base['single_items_per_s']:.2f} | {got['p50_ms']:.1f} "
                        f"| {got['p99_ms']:.1f} | {base['single_p50_ms']:.1f} "
                        f"| {got['p50_ms'] - base['single_p50_ms']:+.1f} | {got['rows_per_run']:.1f} |",
                        flush=True,
                    )
            serve.shutdown()
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
