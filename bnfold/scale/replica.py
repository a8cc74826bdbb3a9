"""One Ray Serve replica of a model: a :class:`~bnfold.Predictor` created in the replica, fed by
``@serve.batch``, behind the HTTP API of :mod:`bnfold.scale.http`.

Requests are split into chunks of at most ``max_batch_size`` rows; chunks of concurrent requests
are joined into one ONNX Runtime batch of at most ``max_batch_size`` rows (waiting at most
``batch_wait_ms`` for more), run in a thread so the event loop keeps reading requests meanwhile,
and the outputs split back by rows: each request gets exactly its own rows.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI
from ray import serve

from .. import __version__
from ..batching import plan_batches
from ..predictor import Predictor, TensorSpec
from .cluster import actor_device, actor_threads
from .http import ApiSettings, build_api

# ONNX metadata that bnfold.export writes beside labels and preprocessing.
EXPORTED_WITH_KEY = "bnfold_version"
FOLD_REPORT_KEY = "bnfold_fold_report"


@dataclass(frozen=True)
class ReplicaSettings:
    """What every replica of a model server is given: the model, its batching and its API."""

    model_path: str
    max_batch_size: int
    batch_wait_ms: float
    api: ApiSettings


@dataclass
class BatchStats:
    """What batching has done on this replica so far."""

    batches: int = 0
    rows: int = 0
    largest_batch_rows: int = 0
    largest_batch_requests: int = 0

    def record(self, requests: int, rows: int) -> None:
        self.batches += 1
        self.rows += rows
        self.largest_batch_rows = max(self.largest_batch_rows, rows)
        self.largest_batch_requests = max(self.largest_batch_requests, requests)

    def summary(self) -> dict[str, int]:
        return asdict(self)


def _rows(chunks: list[dict[str, np.ndarray]]) -> int:
    """The rows of a list of chunks (``@serve.batch``'s measure of a batch's size)."""
    return sum(next(iter(chunk.values())).shape[0] for chunk in chunks)


@serve.deployment
@serve.ingress()
class ModelReplica:
    """A model server replica; Ray Serve creates it with :class:`ReplicaSettings`."""

    def __init__(self, settings: ReplicaSettings) -> None:
        self.settings = settings
        self.threads = actor_threads()
        self.predictor = Predictor(settings.model_path, device=actor_device(), threads=self.threads)
        self.stats = BatchStats()
        # One thread runs ONNX Runtime (one batch at a time); the event loop stays free to batch.
        self._runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bnfold-onnxruntime")
        self._run_batch.set_max_batch_size(settings.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(settings.batch_wait_ms / 1000)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self, self.settings.api)

    def check_health(self) -> None:
        """Serve's health check: the replica is healthy once its session is loaded (its
        constructor finished)."""

    async def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs (model order) for checked ``feeds``, run batched with other requests."""
        rows = next(iter(feeds.values())).shape[0]
        chunks = [batch.take(feeds) for batch in plan_batches(rows, self.settings.max_batch_size)]
        parts = await asyncio.gather(*(self._run_batch(chunk) for chunk in chunks))
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate([part[i] for part in parts]) for i in range(len(parts[0]))]

    @serve.batch(batch_size_fn=_rows)
    async def _run_batch(self, chunks: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
        """One ONNX Runtime run for the chunks of several requests; each chunk's own outputs."""
        sizes = [next(iter(chunk.values())).shape[0] for chunk in chunks]
        self.stats.record(len(chunks), sum(sizes))
        feeds = chunks[0] if len(chunks) == 1 else {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        outputs = await asyncio.get_running_loop().run_in_executor(self._runner, self.predictor.run, feeds)
        bounds = np.cumsum([0, *sizes])
        return [[out[a:b] for out in outputs] for a, b in itertools.pairwise(bounds)]

    def metadata(self) -> dict[str, Any]:
        """What ``GET /metadata`` answers: the model's inputs, outputs, labels, preprocessing
        and fold report, where this replica runs it, and how it batches."""
        predictor, meta = self.predictor, self.predictor.metadata
        preprocess = predictor.preprocess
        return {
            "model": os.path.basename(predictor.path),
            "inputs": [_describe(s) for s in predictor.inputs],
            "outputs": [_describe(s) for s in predictor.outputs],
            "labels": predictor.labels,
            "preprocessing": asdict(preprocess) if preprocess is not None else None,
            "device": {"device": predictor.device, "providers": predictor.providers, "threads": self.threads},
            "bnfold_version": __version__,
            "exported_with": meta.get(EXPORTED_WITH_KEY),
            "fold_report": _json_or_none(meta.get(FOLD_REPORT_KEY)),
            "batching": {
                "max_batch_size": self.settings.max_batch_size,
                "batch_wait_ms": self.settings.batch_wait_ms,
                **self.stats.summary(),
            },
        }


def _describe(spec: TensorSpec) -> dict[str, Any]:
    """Name, shape (``null`` for a free dimension such as the batch axis) and dtype."""
    return {
        "name": spec.name,
        "shape": [d if isinstance(d, int) else None for d in spec.shape],
        "dtype": spec.dtype.name,
    }


def _json_or_none(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None
