"""One Ray Serve replica of a model: a :class:`~bnfold.Predictor` created in the replica, fed by
``@serve.batch``, behind the HTTP API of :mod:`bnfold.on_ray.http`.

Requests are split into chunks of at most ``max_batch_size`` rows; ``@serve.batch`` gathers the
chunks of concurrent requests (waiting at most ``batch_wait_ms`` for more), and the
:class:`~bnfold.on_ray.run_queue.RunQueue` runs them in ONNX Runtime batches of at most
``max_batch_size`` rows, in a thread so the event loop keeps reading requests meanwhile, joining
the batches that wait for a run. The outputs are split back by rows: each request gets exactly its
own rows.

A request that finds the replica idle (no other request in it, no run going or waiting) has no
one to be batched with: it goes to the run queue at once instead of waiting ``batch_wait_ms`` in
``@serve.batch``. The requests that arrive while it runs are batched as usual.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI
from ray import serve

from .. import __version__
from ..batching import plan_batches
from ..predictor import Predictor
from ..predictor.summary import model_summary
from .cluster import actor_device, actor_threads
from .http import ApiSettings, build_api
from .run_queue import RunQueue, rows_of

# ONNX metadata that bnfold.export writes beside labels and preprocessing.


@dataclass(frozen=True)
class ReplicaSettings:
    """What every replica of a model server is given: the model, its batching and its API."""

    model_path: str
    max_batch_size: int
    batch_wait_ms: float
    api: ApiSettings


def _rows(chunks: list[dict[str, np.ndarray]]) -> int:
    """The rows of a list of chunks (``@serve.batch``'s measure of a batch's size)."""
    return sum(rows_of(chunk) for chunk in chunks)


@serve.deployment
@serve.ingress()
class ModelReplica:
    """A model server replica; Ray Serve creates it with :class:`ReplicaSettings`."""

    def __init__(self, settings: ReplicaSettings) -> None:
        _replica_grpc_on_loopback()
        self.settings = settings
        self.threads = actor_threads()
        self.predictor = Predictor(settings.model_path, device=actor_device(), threads=self.threads, spin_wait=False)
        # ONNX Runtime runs in a thread, one batch at a time: the event loop stays free to batch.
        self._runs = RunQueue(self.predictor.run, settings.max_batch_size)
        self._requests = 0  # requests inside infer (each on this replica's event loop)
        self._queue_batch.set_max_batch_size(settings.max_batch_size)
        self._queue_batch.set_batch_wait_timeout_s(settings.batch_wait_ms / 1000)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self, self.settings.api)

    def check_health(self) -> None:
        """Serve's health check: the replica is healthy once its session is loaded (its
        constructor finished)."""

    async def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs (model order) for checked ``feeds``, run batched with other requests."""
        rows = rows_of(feeds)
        chunks = [batch.take(feeds) for batch in plan_batches(rows, self.settings.max_batch_size)]
        self._requests += 1
        try:
            if self._requests == 1 and self._runs.idle:  # alone: nothing to wait for
                queued = self._runs.submit(chunks)
            else:
                queued = await asyncio.gather(*(self._queue_batch(chunk) for chunk in chunks))
            parts = await asyncio.gather(*queued)
        finally:
            self._requests -= 1
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate([part[i] for part in parts]) for i in range(len(parts[0]))]

    @serve.batch(batch_size_fn=_rows)
    async def _queue_batch(self, chunks: list[dict[str, np.ndarray]]) -> list[asyncio.Future[list[np.ndarray]]]:
        """Hand a batch Serve formed to the run queue at once (so that Serve goes on forming the
        next, which the queue joins to it while the model is busy); each chunk's future outputs."""
        return self._runs.submit(chunks)

    def metadata(self) -> dict[str, Any]:
        """What ``GET /metadata`` answers: the model (see :func:`bnfold.predictor.summary.model_summary`:
        inputs, outputs, labels, preprocessing, weights, fold report, INT8 facts), where this
        replica runs it, and how it batches."""
        predictor = self.predictor
        return {
            "model": os.path.basename(predictor.path),
            **model_summary(predictor),
            "device": {"device": predictor.device, "providers": predictor.providers, "threads": self.threads},
            "bnfold_version": __version__,
            "batching": {
                "max_batch_size": self.settings.max_batch_size,
                "batch_wait_ms": self.settings.batch_wait_ms,
                **self._runs.stats.summary(),
            },
        }


def _replica_grpc_on_loopback() -> None:
    """On a node whose address is loopback (a local instance of ``bnfold serve``: see
    :func:`bnfold.on_ray.cluster.ray_instance`), bind this replica's inter-deployment gRPC server
    to 127.0.0.1 like every other server of the node. Ray Serve 2.60 binds it to all interfaces
    whatever the node's address (``"[::]:0"``, written in ``ray.serve._private.replica``), once
    the replica's constructor has run; with Ray's token authentication off it would then take
    unauthenticated requests from other machines."""
    if not ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback:
        return
    from ray.serve._private import replica as serve_replica

    bind = serve_replica.add_port_to_grpc_server
    serve_replica.add_port_to_grpc_server = lambda server, address: bind(server, address.replace("[::]", "127.0.0.1"))
