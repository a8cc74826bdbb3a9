"""What every Ray feature of bnfold shares: importing Ray (or the one-line error naming the
extra), starting or joining a Ray instance, and turning an actor's Ray resources into ONNX
Runtime threads and a device."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from types import ModuleType

from ..errors import BnfoldError, Param, Part, UsageError, first_line

RAY_EXTRA = "pip install 'bnfold[ray]'"


def require_ray() -> ModuleType:
    """The ``ray`` module with Ray Data, or a :class:`UsageError` saying which extra to install."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise UsageError(f"running on Ray needs Ray Data, which is not installed: {RAY_EXTRA}") from exc
    return ray


@contextlib.contextmanager
def ray_instance(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    temp_dir: str | os.PathLike[str] | None = None,
    token_auth: bool = True,
) -> Iterator[ModuleType]:
    """Ray for the duration: the instance this process already joined, else the cluster at
    ``address`` (``"auto"``, ``"host:port"`` or ``"ray://host:port"``), else a new local instance
    (``num_cpus``: default all; ``temp_dir``: Ray's session files; no dashboard, no metrics, every
    port on 127.0.0.1). What this call started or joined it leaves again at the end.

    ``token_auth=False`` starts a local instance without Ray's token authentication, which
    otherwise writes a token to ``~/.ray/auth_token`` (tests use it to stay hermetic).
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    saved_auth = os.environ.get("RAY_AUTH_MODE")
    if not token_auth and address is None:
        os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        try:
            _init(ray, address, num_cpus, temp_dir)
            yield ray
        finally:  # also what an interrupted ray.init had started
            ray.shutdown()
    finally:
        if saved_auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved_auth


def _init(ray: ModuleType, address: str | None, num_cpus: int | None, temp_dir: object) -> None:
    """``ray.init`` for :func:`ray_instance`: quiet (warnings and worse), its failures a
    :class:`BnfoldError` naming the ``address``; a new local instance on loopback only.

    ``ray.init`` sets a SIGTERM handler of its own that exits the process with status 15 (a
    ``SystemExit``); a SIGTERM during ``ray.init`` is an interruption like Ctrl-C here (a
    ``KeyboardInterrupt``), and a handler the caller had set is set again afterwards."""
    options: dict[str, object] = {"logging_level": logging.WARNING}
    local = address is None and not os.environ.get("RAY_ADDRESS")  # ray.init joins RAY_ADDRESS
    if local:
        options.update(
            num_cpus=num_cpus,
            include_dashboard=False,
            _temp_dir=None if temp_dir is None else str(temp_dir),
            _system_config=dict(LOCAL_SYSTEM_CONFIG),  # a copy: ray.init adds to it
        )
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        with _loopback_node() if local else contextlib.nullcontext():
            ray.init(address=address, **options)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        if local:
            where: tuple[Part, ...] = ("a local Ray instance",)
        elif address:
            where = ("the Ray cluster at ", Param("address"), f" {address!r}")
        else:
            where = (f"RAY_ADDRESS {os.environ['RAY_ADDRESS']!r}",)
        raise BnfoldError("cannot start or join ", *where, f": {first_line(exc)}") from exc
    except SystemExit as exc:  # what Ray's own SIGTERM handler, set by ray.init, raises meanwhile
        if exc.code != signal.SIGTERM:
            raise
        raise KeyboardInterrupt from exc
    finally:
        if callable(on_sigterm) and signal.getsignal(signal.SIGTERM) is not on_sigterm:
            signal.signal(signal.SIGTERM, on_sigterm)  # the caller's handler, which ray.init replaced


# A local instance exports no metrics: nothing of bnfold reads them, and the agent's metrics port
# is one listening socket fewer.
LOCAL_SYSTEM_CONFIG = {"enable_metrics_collection": False}


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """A local Ray instance started meanwhile takes 127.0.0.1 as its node address, and so binds
    every server it opens to loopback: the GCS, the raylet's node and object managers, the
    workers, the dashboard and runtime-env agents, the metrics exporters (each binds to localhost
    when the node address is a loopback one, and to all interfaces otherwise).

    Ray 2.60 offers no option for this: ``ray.init(_node_ip_address="127.0.0.1")`` is turned back
    into the machine's address, except where Ray runs without cluster support (its
    ``ENABLE_RAY_CLUSTER``, false on macOS and Windows), which is what a local instance is."""
    import ray._private.ray_constants as ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def node_resources() -> list[dict[str, float]]:
    """The CPUs and GPUs of each live node of the Ray cluster."""
    ray = require_ray()
    return [
        {kind: float(node["Resources"].get(kind, 0.0)) for kind in ("CPU", "GPU")}
        for node in ray.nodes()
        if node.get("Alive")
    ]


def default_cpus_per_actor(max_actors: int, nodes: list[dict[str, float]]) -> float:
    """CPUs for each of at most ``max_actors`` actors on ``nodes``: all their CPUs shared among
    the actors, at most one node's (an actor runs on one node) and at least one."""
    total = sum(node["CPU"] for node in nodes)
    largest = max((node["CPU"] for node in nodes), default=1.0)
    return float(max(1, min(int(largest), int(total // max_actors))))


def bnfold_cause(exc: BaseException) -> BnfoldError | None:
    """The :class:`BnfoldError` that a Ray error (a task or actor that failed) wraps, if any."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)  # Ray's RayTaskError: the error the task raised
        if isinstance(current, BnfoldError) and cause is None:
            return current
        pending += [cause, current.__cause__, current.__context__]
    return None


def actor_threads() -> int:
    """ONNX Runtime intra-op threads for the calling actor: the CPUs Ray assigned to it (Ray sets
    ``OMP_NUM_THREADS``, which ONNX Runtime ignores), at least one."""
    ray = require_ray()
    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def actor_device() -> str:
    """``"cuda"`` when Ray assigned the calling actor a GPU, else ``"cpu"``: Ray no longer hides
    the GPUs from an actor that asked for none, so what CUDA sees proves nothing."""
    return "cuda" if require_ray().get_gpu_ids() else "cpu"
