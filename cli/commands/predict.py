"""``bnfold predict``: run an exported ONNX model on arrays or images and print its predictions."""

from __future__ import annotations

import json
import sys
import warnings

import click
import numpy as np
from bnfold.cli.commands.predict_ray import predict_on_ray
from bnfold.cli.flags import LibraryArgument
from bnfold.cli.options import RayOptions, output_option, ray_options

from bnfold.errors import UsageError
from bnfold.predictor import DEVICES, CudaUnavailableWarning, Predictor, check_top_k, class_label, predict_files, top_k
from bnfold.progress import for_stream
from bnfold.staging import atomic_write, check_output_path

DEFAULT_PREDICT_BATCH = 32


@click.command("predict")
@click.argument("onnx_model", type=click.Path(dir_okay=True))
@click.argument("inputs", nargs=-1, required=True, cls=LibraryArgument, parameter="data")
@output_option("Write all outputs to this .npz (one array per model output).")
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="cuda, cpu, or auto (CUDA when it works, else CPU with a warning).",
)
@click.option(
    "--batch-size", type=int, default=DEFAULT_PREDICT_BATCH, show_default=True, help="Samples per ONNX Runtime call."
)
@click.option("--top-k", type=int, default=1, show_default=True, help="Classes printed per sample (2-D outputs).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per sample instead of text.")
@ray_options
@click.option("--verbose", is_flag=True, help="With --ray: show Ray's own log lines and messages, hidden otherwise.")
def predict_command(
    onnx_model: str,
    inputs: tuple[str, ...],
    output: str | None,
    device: str,
    batch_size: int,
    top_k: int,
    as_json: bool,
    scale: RayOptions,
    verbose: bool,
) -> None:
    """Run ONNX_MODEL on INPUTS: .npy/.npz files, or image files (with the preprocessing the
    model was exported with), or folders of them (read recursively; names starting with . or _
    skipped).

    With --ray: on Ray Data, over any number of image, .npy/.npz or parquet files, folders, glob
    patterns or object-store URLs, writing one row per item to -o OUT.parquet.
    """
    scale.check()
    if scale.ray:
        if as_json or device != "auto":
            raise UsageError(f"{'--json' if as_json else '--device'} does not apply to --ray (see --gpus-per-actor)")
        predict_on_ray(onnx_model, inputs, output, batch_size, top_k, scale, verbose)
        return
    if verbose:
        raise UsageError("--verbose needs --ray")
    check_top_k(top_k)
    if output:
        check_output_path(output)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CudaUnavailableWarning)
        predictor = Predictor(onnx_model, device=device, batch_size=batch_size)
    for warning in caught:
        click.echo(f"bnfold: warning: {warning.message}", err=True)
    predictions = predict_files(predictor, inputs, progress=for_stream(sys.stderr))
    names, outputs = predictions.names, predictions.outputs
    if output:
        _write_npz(output, outputs)
    _print_predictions(next(iter(outputs.values())), names, predictor.labels, top_k, as_json)
    if output and not as_json:
        click.echo(f"Wrote {output}")


def _write_npz(path: str, outputs: dict[str, np.ndarray | list[np.ndarray]]) -> None:
    """Write ``outputs`` to ``path`` atomically (temp file beside it, then rename): an array per
    output, or ``<output>_<i>`` per sample of an output whose samples differ in shape."""
    arrays = {}
    for name, value in outputs.items():
        arrays.update({f"{name}_{i}": row for i, row in enumerate(value)} if isinstance(value, list) else {name: value})
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def _print_predictions(
    scores: np.ndarray | list[np.ndarray], names: list[str], labels: list[str] | None, k: int, as_json: bool
) -> None:
    if isinstance(scores, list):  # one shape per sample
        for name, row in zip(names, scores):
            shape = "x".join(map(str, row.shape))
            click.echo(json.dumps({"sample": name, "shape": list(row.shape)}) if as_json else f"{name}\t{shape}")
        return
    if scores.ndim != 2:
        if as_json:
            for name, row in zip(names, scores):
                click.echo(json.dumps({"sample": name, "shape": list(row.shape)}))
        else:
            click.echo(f"{len(names)} sample(s): output shape {'x'.join(map(str, scores.shape))}")
        return
    indices, values = top_k(scores, k)
    for name, row_indices, row_scores in zip(names, indices, values):
        best = [
            {"class": int(j), "label": class_label(labels, j), "score": float(v)}
            for j, v in zip(row_indices, row_scores)
        ]
        if as_json:
            click.echo(json.dumps({"sample": name, "top_k": best}))
        else:
            click.echo(f"{name}\t" + ", ".join(f"{b['label']} ({b['score']:.4g})" for b in best))
