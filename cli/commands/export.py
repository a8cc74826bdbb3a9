"""``bnfold export``: fold, export to ONNX and verify a PyTorch model."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import click
from bnfold.cli.flags import LibraryOption
from bnfold.cli.options import (
    InputShapeOptions,
    MetadataOptions,
    ModelOptions,
    VerifyOptions,
    export_options,
    input_shape_options,
    metadata_options,
    model_options,
    output_option,
    verify_options,
)
from bnfold.cli.output import write_json

from bnfold.defaults import RECALIBRATION_BATCH_SIZE
from bnfold.errors import VerificationError
from bnfold.export_options import ExportOptions
from bnfold.progress import for_stream
from bnfold.report import Int8Report
from bnfold.staging import check_output_path


@click.command("export")
@click.argument("model", type=click.Path(dir_okay=True))
@output_option("ONNX file to write (default: <model stem>.onnx beside the model).")
@model_options
@input_shape_options
@export_options
@verify_options(float16_when="with --fp16 or a float16 model")
@metadata_options
@click.option(
    "--recalibrate",
    "recalibrate_data",
    type=click.Path(),
    cls=LibraryOption,
    parameter="recalibrate",
    help="Recompute every batch-norm's running statistics as the exact population statistics of this data (.npy/.npz) before folding.",
)
@click.option(
    "--recalibrate-batch-size",
    type=int,
    default=RECALIBRATION_BATCH_SIZE,
    show_default=True,
    cls=LibraryOption,
    parameter="batch_size",
    help="Batch size of the recalibration pass.",
)
@click.option("--report", "report_path", type=click.Path(), help="Write the full fold + verify report as JSON here.")
def export_command(
    model: str,
    output: str | None,
    recalibrate_data: str | None,
    recalibrate_batch_size: int,
    report_path: str | None,
    *,
    loading: ModelOptions,
    input_shape: InputShapeOptions,
    exporting: dict[str, Any],
    verification: VerifyOptions,
    metadata: MetadataOptions,
) -> None:
    """Fold, export to ONNX and verify MODEL (TorchScript, torch.export, state_dict + --arch, or a trusted pickle)."""
    from bnfold.exporting import default_output_path, export  # imports torch: only when the command runs
    from bnfold.recalibration import recalibrate

    options = ExportOptions(**exporting, **verification.kwargs())  # checked before the slow steps
    shapes = input_shape.shapes()
    source = model if Path(model).exists() else None
    out = Path(output) if output else default_output_path(model)
    check_output_path(out, source)
    if report_path:
        check_output_path(report_path, source, option="--report")
    progress = for_stream(sys.stderr)
    progress.start(f"Loading {model}")
    loaded = loading.load(model)
    progress.finish()
    example = loaded.example_inputs(shapes)
    labels = metadata.labels(loaded)
    options = dataclasses.replace(
        options,
        labels=tuple(labels) if labels else None,
        preprocess=metadata.preprocess(loaded, example, options.dynamic_size),
    )
    recalibration = None
    if recalibrate_data:
        recalibration = recalibrate(
            loaded.module, recalibrate_data, inputs=len(example), batch_size=recalibrate_batch_size, progress=progress
        )
        click.echo(str(recalibration))
    try:
        result = export(loaded.module, example, out, options, source=model, progress=progress)
    except VerificationError as exc:
        if report_path and exc.report is not None:
            section = "int8" if isinstance(exc.report, Int8Report) else "verify"
            write_json(report_path, {"model": model, "passed": False, section: exc.report.to_dict()})
        raise
    click.echo(f"Model: {model} ({loaded.format})")
    click.echo(str(result))
    if report_path:
        extra = {"recalibration": recalibration.to_dict()} if recalibration else {}
        write_json(report_path, {"model": model, "format": loaded.format, **result.to_dict(), **extra})
    click.echo(f"Wrote {result.path}")
