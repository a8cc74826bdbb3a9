"""bnfold's model server on Ray Serve: :func:`model_app` builds the application (to run with
``serve.run`` beside your own deployments), :func:`model_server` starts it on a Ray instance and
:func:`serve_until_stopped` runs it until SIGTERM or Ctrl-C (``bnfold serve``).

Needs the ``bnfold[ray]`` extra. The HTTP API is in :mod:`bnfold.scale.http`, a replica in
:mod:`bnfold.scale.replica`.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import ModelLoadError, UsageError
from ..predictor import check_top_k
from .cluster import RAY_EXTRA, default_cpus_per_actor, node_resources, ray_instance

APP_NAME = "bnfold"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_BATCH_WAIT_MS = 5.0
DEFAULT_MAX_BODY_MB = 32.0
DEFAULT_TOP_K = 5
# Requests a replica takes at once, per row of its largest batch: enough queued behind the
# running batch to fill the next one (Serve's default of 5 would cap every batch at 5).
ONGOING_PER_BATCH_ROW = 4

# Serve's and the replicas' logging: warnings and errors (with tracebacks), no access log lines.
QUIET = {"log_level": "WARNING"}

Replicas = int | tuple[int, int]


def require_serve() -> ModuleType:
    """The ``ray.serve`` module, or a :class:`UsageError` saying which extra to install."""
    try:
        from ray import serve
    except ImportError as exc:
        raise UsageError(f"serving a model needs Ray Serve, which is not installed: {RAY_EXTRA}") from exc
    return serve


def model_app(
    model: str | Path,
    *,
    replicas: Replicas = 1,
    cpus_per_replica: float | None = None,
    gpus_per_replica: float = 0.0,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
    max_body_mb: float = DEFAULT_MAX_BODY_MB,
    token: str | None = None,
    top_k: int = DEFAULT_TOP_K,
) -> Any:
    """The Ray Serve application serving the ONNX ``model`` (a ``serve.Application``).

    ``replicas``: a number, or ``(min, max)`` for Serve's autoscaling. Each replica creates its
    own :class:`~bnfold.Predictor` with ONNX Runtime threads equal to ``cpus_per_replica``
    (default: the cluster's CPUs shared among the replicas when Ray is running, else 1) and CUDA
    only with ``gpus_per_replica`` > 0. Requests are run together in batches of up to
    ``max_batch_size`` rows, waiting up to ``batch_wait_ms`` to fill one. Bodies over
    ``max_body_mb`` MiB are refused; with ``token``, requests must carry
    ``Authorization: Bearer <token>`` (only its digest is sent to the replicas). Classifiers
    answer with their ``top_k`` classes per item.

    The model path must be readable on every node that runs a replica.
    """
    lowest, highest = _check_replicas(replicas)
    _check_positive(max_batch_size=max_batch_size, max_body_mb=max_body_mb)
    _check_non_negative(batch_wait_ms=batch_wait_ms, gpus_per_replica=gpus_per_replica)
    if cpus_per_replica is not None:
        _check_positive(cpus_per_replica=cpus_per_replica)
    check_top_k(top_k)
    path = Path(model).resolve()
    if not path.is_file():
        raise ModelLoadError(f"ONNX model {path} does not exist")
    require_serve()
    from .auth import token_digest
    from .http import ApiSettings
    from .replica import ModelReplica, ReplicaSettings

    settings = ReplicaSettings(
        str(path),
        max_batch_size,
        batch_wait_ms,
        ApiSettings(int(max_body_mb * 2**20), token_digest(token) if token else None, top_k),
    )
    scaling: dict[str, Any] = (
        {"num_replicas": lowest}
        if lowest == highest
        else {
            "autoscaling_config": {
                "min_replicas": lowest,
                "max_replicas": highest,
                "target_ongoing_requests": max_batch_size,
            }
        }
    )
    if cpus_per_replica is None:
        import ray

        cpus_per_replica = default_cpus_per_actor(highest, node_resources()) if ray.is_initialized() else 1.0
    deployment = ModelReplica.options(
        name=APP_NAME,
        max_ongoing_requests=ONGOING_PER_BATCH_ROW * max_batch_size,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        **scaling,
    )
    return deployment.bind(settings)


def _check_replicas(replicas: Replicas) -> tuple[int, int]:
    """(min, max) replicas; a :class:`UsageError` naming ``replicas`` if they make no sense."""
    lowest, highest = replicas if isinstance(replicas, tuple) else (replicas, replicas)
    if lowest < 1 or highest < lowest:
        raise UsageError(f"`replicas` must be at least 1, or (min, max) with 1 <= min <= max (got {replicas})")
    return lowest, highest


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise UsageError(f"`{name}` must be positive (got {value})")


def _check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if not value >= 0:
            raise UsageError(f"`{name}` must not be negative (got {value})")


@dataclass(frozen=True)
class RunningServer:
    """A started model server: where it listens, and the ``/metadata`` of one of its replicas."""

    url: str
    metadata: dict[str, Any]


@contextlib.contextmanager
def model_server(
    model: str | Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    ray_address: str | None = None,
    **app_options: Any,
) -> Iterator[RunningServer]:
    """The model server running for the duration, on the Ray cluster at ``ray_address`` or on a
    new local Ray instance; its HTTP proxy listens on ``host``:``port`` (see :func:`model_app`
    for ``app_options``). At the end it deletes the application, and shuts Serve and Ray down
    when it started them."""
    serve = require_serve()
    import ray

    own_instance = ray_address is None and not ray.is_initialized()
    if own_instance:
        _check_port_free(host, port)
    with ray_instance(ray_address):
        serve.start(http_options={"host": host, "port": port}, logging_config=QUIET)
        try:
            handle = serve.run(model_app(model, **app_options), name=APP_NAME, route_prefix="/", logging_config=QUIET)
            metadata = handle.metadata.remote().result()
            shown = f"[{host}]" if ":" in host else host
            yield RunningServer(f"http://{shown}:{port}", metadata)
        finally:
            if own_instance:
                serve.shutdown()
            else:  # someone else's Ray (and perhaps Serve): leave everything but this application
                serve.delete(APP_NAME)


def _check_port_free(host: str, port: int) -> None:
    """A :class:`UsageError` naming ``port`` if this machine cannot listen on ``host``:``port``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UsageError(f"cannot listen on `host` {host} `port` {port}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`KeyboardInterrupt` (as Ctrl-C does) for the duration, so that a
    service manager's stop runs the same clean shutdown."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM (inside :func:`sigterm_as_interrupt`); then return."""
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()
