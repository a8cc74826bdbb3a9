"""``bnfold predict --ray``: the predictions of many files by a pool of Ray Data actors, written to
a parquet folder, with a one-line summary; exit code 6 when some rows failed."""

from __future__ import annotations

import click
from bnfold.cli.options import RayOptions
from bnfold.cli.ray_output import ray_output
from bnfold.cli.signals import sigterm_interrupts

from bnfold.errors import EXIT_ROWS_FAILED, BnfoldError, UsageError


class RowsFailedError(BnfoldError):
    """Some rows could not be predicted; the output holds them with their error."""

    exit_code = EXIT_ROWS_FAILED


def predict_on_ray(
    model: str,
    inputs: tuple[str, ...],
    output: str | None,
    batch_size: int,
    top_k: int,
    scale: RayOptions,
    verbose: bool,
) -> None:
    """Predict ``inputs`` on Ray (a local instance, or the cluster at ``--ray-address``) into
    ``output``, then print the summary; Ray's own output only if ``verbose``."""
    if not output:
        raise UsageError("--ray writes its predictions to a parquet folder: give -o OUT.parquet")
    from bnfold.on_ray import predict_dataset, ray_instance, write_predictions

    actors = scale.pool()
    with sigterm_interrupts(), ray_output(verbose), ray_instance(scale.ray_address):
        predictions = predict_dataset(
            model,
            list(inputs),
            batch_size=batch_size,
            top_k=top_k,
            actors=actors,
            cpus_per_actor=scale.cpus_per_actor,
            gpus_per_actor=scale.gpus_per_actor or 0.0,
        )
        summary = write_predictions(predictions, output)
    pool = f"{actors[0]}-{actors[1]}" if isinstance(actors, tuple) else str(actors)
    device = "cuda" if scale.gpus_per_actor else "cpu"
    click.echo(
        f"{summary.rows} rows, {summary.errors} failed, in {summary.seconds:.1f} s ({summary.rows_per_second:.1f} "
        f"rows/s) on {pool} actor(s), {device}; wrote {summary.path}"
    )
    if summary.errors:
        raise RowsFailedError(
            f"{summary.errors} of {summary.rows} rows failed: their 'error' column in {summary.path} says why"
        )
