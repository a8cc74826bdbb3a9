"""``bnfold inspect``: what export would do with each batch-norm, without exporting; for an
exported ``.onnx`` file, what it is (inputs, outputs, weights' dtype or INT8, fold summary)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from bnfold.cli.flags import LibraryOption
from bnfold.cli.options import InputShapeOptions, ModelOptions, input_shape_options, model_options


@click.command("inspect")
@click.argument("model", type=click.Path(dir_okay=True))
@model_options
@input_shape_options
@click.option(
    "--static-batch",
    is_flag=True,
    cls=LibraryOption,
    parameter="dynamic_batch",
    setting=False,
    help="Trace with a fixed batch size.",
)
@click.option(
    "--dynamic-size",
    is_flag=True,
    cls=LibraryOption,
    help="Trace with free image heights and widths, and list the sizes the model takes.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the fold report as JSON.")
def inspect_command(
    model: str,
    static_batch: bool,
    dynamic_size: bool,
    as_json: bool,
    *,
    loading: ModelOptions,
    input_shape: InputShapeOptions,
) -> None:
    """List every batch-norm of MODEL and what export would do with it, without exporting.

    For an exported MODEL.onnx: its inputs, outputs, image size (fixed, or dynamic and the sizes it
    takes), weights (float32, float16 or INT8, with the INT8 check's figures), fold summary, labels
    and preprocessing.
    """
    if Path(model).suffix.lower() == ".onnx":
        _inspect_onnx(model, as_json)
        return
    from bnfold.folding import fold  # imports torch: only when the command runs

    shapes = input_shape.shapes()
    loaded = loading.load(model)
    inputs = loaded.example_inputs(shapes)
    report = fold(loaded.module, inputs, dynamic_batch=not static_batch, dynamic_size=dynamic_size).report
    if as_json:
        shapes_seen = [list(t.shape) for t in inputs]
        click.echo(
            json.dumps(
                {"model": model, "format": loaded.format, "input_shapes": shapes_seen, **report.to_dict()}, indent=2
            )
        )
        return
    click.echo(
        f"Model: {model} ({loaded.format}); input shape(s): {', '.join('x'.join(map(str, t.shape)) for t in inputs)}; "
        f"image size {report.size_summary()}"
    )
    click.echo(str(report))


def _inspect_onnx(path: str, as_json: bool) -> None:
    from bnfold.predictor import Predictor
    from bnfold.predictor.summary import model_summary, summary_text

    summary = model_summary(Predictor(path, device="cpu"))
    click.echo(json.dumps({"model": path, **summary}, indent=2) if as_json else summary_text(path, summary))
