"""``bnfold serve``: serve an exported ONNX model over HTTP on Ray Serve until Ctrl-C or SIGTERM.

Ctrl-C or SIGTERM before the server is serving stops the start-up, shuts down what it had started
and exits with code 130; once it serves, either stops it cleanly with code 0.
"""

from __future__ import annotations

import click
from bnfold.cli.flags import LibraryOption
from bnfold.cli.ray_output import ray_output
from bnfold.cli.signals import sigterm_interrupts

from bnfold.errors import EXIT_INTERRUPTED, BnfoldError
from bnfold.on_ray.serve import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    RunningServer,
    model_server,
    wait_for_stop,
)
from bnfold.on_ray.serve_options import (
    DEFAULT_BATCH_WAIT_MS,
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_BODY_MB,
    DEFAULT_TOP_K,
    parse_replicas,
)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ServeInterrupted(BnfoldError):
    """Ctrl-C or SIGTERM stopped ``bnfold serve`` before it was serving (or a second one while it
    stopped): nothing is served, and nothing was written either."""

    exit_code = EXIT_INTERRUPTED


@click.command("serve")
@click.argument("onnx_model", type=click.Path(dir_okay=False))
@click.option(
    "--host",
    default=DEFAULT_HOST,
    show_default=True,
    help="Interface to listen on; 0.0.0.0 serves every interface (use --token-file then).",
)
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True, help="TCP port to listen on.")
@click.option(
    "--replicas",
    default="1",
    show_default=True,
    metavar="N|MIN,MAX",
    help="Replicas of the model, or a range for Ray Serve's autoscaling.",
)
@click.option(
    "--cpus-per-replica",
    type=float,
    help="Ray CPUs (= ONNX Runtime threads) per replica. Default: the cluster's CPUs shared among the replicas.",
)
@click.option(
    "--gpus-per-replica",
    type=float,
    default=0.0,
    show_default=True,
    help="Ray GPUs per replica (fractions share a GPU); replicas use CUDA only when given one.",
)
@click.option(
    "--max-batch-size",
    type=int,
    default=DEFAULT_MAX_BATCH_SIZE,
    show_default=True,
    help="Most rows run together in one ONNX Runtime batch.",
)
@click.option(
    "--batch-wait-ms",
    type=float,
    default=DEFAULT_BATCH_WAIT_MS,
    show_default=True,
    help="Longest wait for more requests to fill a batch (none for a request alone on the replica).",
)
@click.option(
    "--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB, show_default=True, help="Largest request body (MiB)."
)
@click.option(
    "--body-timeout-s",
    type=float,
    default=DEFAULT_BODY_TIMEOUT_S,
    show_default=True,
    help="Longest wait for a request's body; a body not received by then is answered 408.",
)
@click.option(
    "--top-k", type=int, default=DEFAULT_TOP_K, show_default=True, help="Classes answered per item (classifiers)."
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    help="Require 'Authorization: Bearer TOKEN' with the token in this file (/health stays open).",
)
@click.option(
    "--ray-address",
    cls=LibraryOption,
    parameter="address",
    help="Run on this Ray cluster (auto, HOST:PORT or ray://HOST:PORT) instead of a new local Ray instance.",
)
@click.option("--verbose", is_flag=True, help="Show Ray's own log lines and messages, which are hidden otherwise.")
def serve_command(
    onnx_model: str,
    host: str,
    port: int,
    replicas: str,
    cpus_per_replica: float | None,
    gpus_per_replica: float,
    max_batch_size: int,
    batch_wait_ms: float,
    max_body_mb: float,
    body_timeout_s: float,
    top_k: int,
    token_file: str | None,
    ray_address: str | None,
    verbose: bool,
) -> None:
    """Serve ONNX_MODEL over HTTP (POST /predict, GET /metadata, GET /health) on Ray Serve, with
    requests batched together, until Ctrl-C or SIGTERM."""
    from bnfold.on_ray.auth import read_token

    serving = False
    try:
        token = read_token(token_file) if token_file else None
        if host not in LOOPBACK and token is None:
            click.echo(
                f"bnfold: warning: serving on {host} without --token-file: anyone who can reach this "
                "machine can use the model",
                err=True,
            )
        with (
            sigterm_interrupts(),
            ray_output(verbose),
            model_server(
                onnx_model,
                host=host,
                port=port,
                ray_address=ray_address,
                replicas=parse_replicas(replicas),
                cpus_per_replica=cpus_per_replica,
                gpus_per_replica=gpus_per_replica,
                max_batch_size=max_batch_size,
                batch_wait_ms=batch_wait_ms,
                max_body_mb=max_body_mb,
                body_timeout_s=body_timeout_s,
                token=token,
                top_k=top_k,
            ) as server,
        ):
            click.echo(_started(server, onnx_model, replicas, token is not None))
            serving = True
            wait_for_stop()
            click.echo("bnfold: stopping the model server", err=True)
    except KeyboardInterrupt as exc:
        if serving:
            raise ServeInterrupted("interrupted while the model server was stopping") from exc
        raise ServeInterrupted("interrupted before the model server was serving; what had started is stopped") from exc
    click.echo("bnfold: stopped", err=True)


def _started(server: RunningServer, model: str, replicas: str, token: bool) -> str:
    """The start-up line: where the server listens and how it runs the model."""
    device = server.metadata["device"]
    return (
        f"bnfold: serving {model} at {server.url} ({replicas} replica(s), {device['device']}, "
        f"{device['threads']} thread(s) each; {'bearer token required' if token else 'no token'}): "
        f"POST {server.url}/predict, GET /metadata, GET /health; Ctrl-C or SIGTERM stops it"
    )
