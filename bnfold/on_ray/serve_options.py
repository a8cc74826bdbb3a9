"""How a model is served: replicas and their resources, batching, body limit, token, top-k;
checked when created, before anything starts. No Ray needed."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import Param, UsageError
from ..predictor import check_top_k

DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_BATCH_WAIT_MS = 5.0
DEFAULT_MAX_BODY_MB = 32.0
DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_TOP_K = 5
# Requests a replica takes at once, per row of its largest batch: enough waiting behind the
# running batch to fill the next one (Serve's default of 5 would cap every batch at 5).
ONGOING_PER_BATCH_ROW = 4

Replicas = int | tuple[int, int]


@dataclass(frozen=True)
class ServeOptions:
    """The options of :func:`bnfold.on_ray.serve.model_app`; a :class:`UsageError` naming the
    parameter if one makes no sense.

    ``replicas``: a number, or ``(min, max)`` for Serve's autoscaling. ``cpus_per_replica``: Ray
    CPUs, which are the replica's ONNX Runtime threads (``None``: the cluster's CPUs shared among
    the replicas). ``gpus_per_replica`` > 0: the replica runs on CUDA. Requests are run together
    in batches of up to ``max_batch_size`` rows, waiting up to ``batch_wait_ms`` to fill one (a
    request alone on an idle replica runs at once).
    Bodies over ``max_body_mb`` MiB are refused, and so are those not received within
    ``body_timeout_s`` seconds (see :mod:`bnfold.on_ray.bodies`). ``token``: requests must carry
    ``Authorization: Bearer <token>``. Classifiers answer with their ``top_k`` best classes.
    """

    replicas: Replicas = 1
    cpus_per_replica: float | None = None
    gpus_per_replica: float = 0.0
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS
    max_body_mb: float = DEFAULT_MAX_BODY_MB
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    token: str | None = field(default=None, repr=False)
    top_k: int = DEFAULT_TOP_K

    def __post_init__(self) -> None:
        lowest, highest = self.replica_range
        if lowest < 1 or highest < lowest:
            raise UsageError(
                Param("replicas"), f" must be at least 1, or (min, max) with 1 <= min <= max (got {self.replicas})"
            )
        _check(self.max_batch_size > 0, "max_batch_size", "must be positive", self.max_batch_size)
        _check(self.max_body_mb > 0, "max_body_mb", "must be positive", self.max_body_mb)
        _check(self.body_timeout_s > 0, "body_timeout_s", "must be positive", self.body_timeout_s)
        _check(self.batch_wait_ms >= 0, "batch_wait_ms", "must not be negative", self.batch_wait_ms)
        _check(self.gpus_per_replica >= 0, "gpus_per_replica", "must not be negative", self.gpus_per_replica)
        if self.cpus_per_replica is not None:
            _check(self.cpus_per_replica > 0, "cpus_per_replica", "must be positive", self.cpus_per_replica)
        check_top_k(self.top_k)

    @property
    def replica_range(self) -> tuple[int, int]:
        """(min, max) replicas; the same number twice for a fixed count."""
        return self.replicas if isinstance(self.replicas, tuple) else (self.replicas, self.replicas)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


def _check(ok: bool, name: str, rule: str, value: float) -> None:
    if not ok:
        raise UsageError(Param(name), f" {rule} (got {value})")


def parse_replicas(text: str) -> Replicas:
    """``"2"`` -> 2, ``"1,4"`` -> (1, 4); a :class:`UsageError` naming ``replicas`` otherwise."""
    parts = text.split(",")
    if not 1 <= len(parts) <= 2 or not all(p.strip().isdigit() for p in parts):
        raise UsageError(
            Param("replicas"), f" {text!r} is not valid: give a number N or a range MIN,MAX (e.g. 2 or 1,4)"
        )
    numbers = [int(p) for p in parts]
    return numbers[0] if len(numbers) == 1 else (numbers[0], numbers[1])
