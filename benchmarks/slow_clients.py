"""Clients that send a request's headers and then stall its body, against `bnfold serve`.

    python benchmarks/slow_clients.py                  # from the repository root
    python benchmarks/slow_clients.py --stalled 64 --seconds 10

A ResNet-18-shaped model (3x224x224) is served as `benchmarks/serve_throughput.py` serves it (one
replica with all the CPUs, the default options). One normal client (`benchmarks/http_load.py`, in
a process of its own) sends one-item `.npy` requests one after another for SECONDS, three times:

1. unloaded;
2. with STALLED connections that sent the headers of such a request (its Content-Length) and
   then nothing, opened just before (the ones the server cuts off stay closed);
3. the same, but every stalled connection the server cuts off is replaced at once, so that
   STALLED of them stall all the time.

Goal (issue 25): with 64 stalled clients, the normal client's p50 within 2x of its unloaded p50.
"""

from __future__ import annotations

import argparse
import io
import os
import select
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_throughput import SHAPE, export_model, load

from bnfold.on_ray.cluster import ray_instance
from bnfold.on_ray.serve import model_app


class StalledClients:
    """``count`` connections to ``port`` that sent the headers of a one-item ``.npy`` request and
    stall; with ``replace``, each one the server answers (cuts off) is replaced by a new one."""

    def __init__(self, port: int, count: int, replace: bool) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.zeros((1, *SHAPE), np.float32))
        self.head = (
            f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/x-npy\r\n"
            f"Content-Length: {len(buffer.getvalue())}\r\n\r\n"
        ).encode()
        self.port, self.replace = port, replace
        self.sockets = [self._open() for _ in range(count)]
        self.cut_off = 0
        self.unexpected: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _open(self) -> socket.socket:
        client = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        client.sendall(self.head)
        return client

    def _watch(self) -> None:
        while not self._stop.is_set():
            answered, _, _ = select.select(self.sockets, [], [], 0.1)
            for client in answered:
                reply = client.recv(100)
                if reply and not reply.startswith(b"HTTP/1.1 408 "):
                    self.unexpected.append(reply)
                self.cut_off += 1
                client.close()
                self.sockets.remove(client)
                if self.replace:
                    self.sockets.append(self._open())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for client in self.sockets:
            client.close()
        if self.unexpected:
            raise RuntimeError(f"stalled clients got other answers than 408, e.g. {self.unexpected[0][:40]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stalled", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        path = export_model(Path(tmp))
        port = 18000 + os.getpid() % 1000
        with ray_instance(num_cpus=cpus, token_auth=False):
            from ray import serve

            serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
            quiet = {"log_level": "WARNING"}
            serve.run(model_app(path, cpus_per_replica=cpus), name="bench", route_prefix="/", logging_config=quiet)
            load(port, 1, "npy", 2.0)  # warm-up
            print(f"{cpus} CPUs; 1 normal client, `.npy` bodies of one item, {args.seconds:g} s per case")
            print("| stalled clients | p50 ms | p99 ms | requests | p50 / unloaded p50 | stalled clients cut off |")
            print("|---|---|---|---|---|---|")
            unloaded = load(port, 1, "npy", args.seconds)
            print(f"| 0 | {unloaded['p50_ms']:.1f} | {unloaded['p99_ms']:.1f} | {unloaded['requests']} | 1.00 | 0 |")
            for replace in (False, True):
                stalled = StalledClients(port, args.stalled, replace)
                started = time.perf_counter()
                got = load(port, 1, "npy", args.seconds)
                held = time.perf_counter() - started
                stalled.close()
                kind = f"{args.stalled}, {'replaced when cut off' if replace else 'opened once'}"
                print(
                    f"| {kind} | {got['p50_ms']:.1f} | {got['p99_ms']:.1f} | {got['requests']} "
                    f"| {got['p50_ms'] / unloaded['p50_ms']:.2f} | {stalled.cut_off} in {held:.0f} s |",
                    flush=True,
                )
            serve.shutdown()


if __name__ == "__main__":
    main()
