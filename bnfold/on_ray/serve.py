"""bnfold's model server on Ray Serve: :func:`model_app` builds the application (to run with
``serve.run`` beside your own deployments), :func:`model_server` runs it on a Ray instance for
the duration, and ``bnfold serve`` waits in it for Ctrl-C or SIGTERM (:func:`wait_for_stop`).

Needs the ``bnfold[ray]`` extra. The options are :class:`ServeOptions`, the HTTP API is in
:mod:`bnfold.on_ray.http`, a replica in :mod:`bnfold.on_ray.replica`.
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

from ..errors import BnfoldError, ModelLoadError, Param, UsageError, first_line
from ..predictor import Predictor
from ..predictor.session import cuda_problem
from .cluster import RAY_EXTRA, default_cpus_per_actor, node_resources, ray_instance
from .serve_options import ONGOING_PER_BATCH_ROW, ServeOptions

APP_NAME = "bnfold"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# Serve's and the replicas' logging: warnings and errors (with tracebacks), no access log lines.
QUIET = {"log_level": "WARNING"}
# Seconds between Serve's health checks of a replica: a dead replica is noticed (and replaced)
# within this time instead of Serve's default 10 s.
HEALTH_CHECK_PERIOD_S = 2.0
STOP_POLL_S = 0.5


def require_serve() -> ModuleType:
    """The ``ray.serve`` module, or a :class:`UsageError` saying which extra to install."""
    try:
        import orjson  # noqa: F401  (the server's JSON answers)
        from ray import serve
    except ImportError as exc:
        missing = "Ray Serve" if exc.name and exc.name.startswith("ray") else exc.name
        raise UsageError(f"serving a model needs {missing}, which is not installed: {RAY_EXTRA}") from exc
    return serve


def model_app(model: str | Path, **options: Any) -> Any:
    """The Ray Serve application (a ``serve.Application``) serving the ONNX ``model``, to run
    with ``serve.run(app, route_prefix=...)`` beside your own deployments; ``options`` are
    :class:`ServeOptions`' fields (``replicas``, ``max_batch_size``, ``token``, ...).

    Each replica creates its own :class:`~bnfold.Predictor` from the path, with ONNX Runtime
    threads equal to its Ray CPUs and CUDA only when Ray gave it a GPU; the model path must be
    readable on every node that runs a replica. With ``cpus_per_replica=None`` the replicas share
    the running Ray cluster's CPUs (1 each when Ray is not running yet). Only the digest of
    ``token`` is sent to the replicas.
    """
    return _application(model, ServeOptions(**options))


def _application(model: str | Path, options: ServeOptions) -> Any:
    path = Path(model).resolve()
    if not path.is_file():
        raise ModelLoadError(f"ONNX model {path} does not exist")
    require_serve()
    import ray

    from .auth import token_digest
    from .bodies import BODY_SLOTS
    from .http import ApiSettings
    from .replica import ModelReplica, ReplicaSettings

    digest = token_digest(options.token) if options.token else None
    api = ApiSettings(options.max_body_bytes, digest, options.top_k, options.body_timeout_s)
    lowest, highest = options.replica_range
    scaling: dict[str, Any] = (
        {"num_replicas": lowest}
        if lowest == highest
        else {
            "autoscaling_config": {
                "min_replicas": lowest,
                "max_replicas": highest,
                "target_ongoing_requests": options.max_batch_size,
            }
        }
    )
    cpus = options.cpus_per_replica
    if cpus is None:
        cpus = default_cpus_per_actor(highest, node_resources()) if ray.is_initialized() else 1.0
    deployment = ModelReplica.options(
        name=APP_NAME,
        # Enough for batching, and for the requests that wait for their body (which the body
        # slots keep to a few, so that clients sending slowly leave the rest free).
        max_ongoing_requests=ONGOING_PER_BATCH_ROW * options.max_batch_size + BODY_SLOTS,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        ray_actor_options={"num_cpus": cpus, "num_gpus": options.gpus_per_replica},
        **scaling,
    )
    return deployment.bind(ReplicaSettings(str(path), options.max_batch_size, options.batch_wait_ms, api))


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
    **options: Any,
) -> Iterator[RunningServer]:
    """The model server running for the duration, on the Ray cluster at ``ray_address`` or on a
    new local Ray instance; its HTTP proxy listens on ``host``:``port``; ``options`` are
    :class:`ServeOptions`' fields, checked before anything starts. At the end it deletes the
    application, and shuts Serve and Ray down when it started them.

    On a local instance the model is first opened here (on the CPU) and CUDA checked when the
    replicas want GPUs, so that what would stop every replica fails at once with its reason."""
    if not 0 <= port <= 65535:
        raise UsageError(Param("port"), f" must be between 0 and 65535 (got {port})")
    checked = ServeOptions(**options)
    serve = require_serve()
    import ray

    own_instance = ray_address is None and not ray.is_initialized()
    if own_instance:
        _check_port_free(host, port)
        problem = cuda_problem() if checked.gpus_per_replica else None
        if problem:
            raise UsageError(Param("gpus_per_replica"), f" {checked.gpus_per_replica}: {problem}")
        Predictor(model, device="cpu", threads=1)
    with ray_instance(ray_address):
        serve.start(http_options={"host": host, "port": port}, logging_config=QUIET)
        try:
            handle = _run(serve, _application(model, checked))
            shown = f"[{host}]" if ":" in host else host
            yield RunningServer(f"http://{shown}:{port}", handle.metadata.remote().result())
        finally:
            if own_instance:
                serve.shutdown()
            else:  # someone else's Ray (and perhaps Serve): leave everything but this application
                serve.delete(APP_NAME)


def _run(serve: ModuleType, app: Any) -> Any:
    """``serve.run`` of the model server's application; its handle, or a :class:`BnfoldError`
    when its replicas cannot start (their errors are in the log)."""
    try:
        return serve.run(app, name=APP_NAME, route_prefix="/", logging_config=QUIET)
    except RuntimeError as exc:
        raise BnfoldError(f"the model server did not start: {first_line(exc)} (the log above says why)") from exc


def _check_port_free(host: str, port: int) -> None:
    """A :class:`UsageError` naming ``port`` if this machine cannot listen on ``host``:``port``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UsageError(
                "cannot listen on ", Param("host"), f" {host} ", Param("port"), f" {port}: {exc.strerror or exc}"
            ) from exc


def wait_for_stop() -> None:
    """Block until Ctrl-C or SIGTERM, then return; SIGTERM stays handled (ignored) afterwards so
    that a service manager's stop runs the caller's clean shutdown. Call it after Ray started:
    Ray's own SIGTERM handler, installed then, exits the process at once."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        while not stop.wait(STOP_POLL_S):
            pass
