"""``bnfold export``: fold, export to ONNX and verify a PyTorch model."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from bnfold.cli.options import (
    InputShapeOptions,
    MetadataOptions,
    ModelOptions,
    VerifyOptions,
    input_shape_options,
    metadata_options,
    model_options,
    verify_options,
)
from bnfold.cli.output import write_json

from bnfold.defaults import RECALIBRATION_BATCH_SIZE
from bnfold.errors import VerificationError
from bnfold.progress import for_stream
from bnfold.staging import check_output_path


@click.command("export")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option(
    "-o", "--output", type=click.Path(), help="ONNX file to write (default: <model stem>.onnx beside the model)."
)
@model_options
@input_shape_options
@click.option(
    "--static-batch", is_flag=True, help="Fix the batch size to the input shape's instead of a dynamic batch axis."
)
@click.option("--opset", type=int, help="ONNX opset version (default: the exporter's).")
@click.option(
    "--no-verify",
    is_flag=True,
    help="Skip verification in ONNX Runtime (the BatchNormalization count is still checked).",
)
@verify_options(float16_when="with --fp16 or a float16 model")
@click.option("--fp16", is_flag=True, help="Export float16 weights and activations (folded in float64 first).")
@click.option("--keep-io-types", is_flag=True, help="With --fp16: keep float32 inputs and outputs.")
@metadata_options
@click.option(
    "--recalibrate",
    "recalibrate_data",
    type=click.Path(),
    help="Recompute every batch-norm's running statistics as the exact population statistics of this data (.npy/.npz) before folding.",
)
@click.option(
    "--recalibrate-batch-size",
    type=int,
    default=RECALIBRATION_BATCH_SIZE,
    show_default=True,
    help="Batch size of the recalibration pass.",
)
@click.option(
    "--rules",
    help="Apply only these fold rules (comma-separated names; default: all; an unknown name lists them).",
)
@click.option("--skip-rules", help="Apply every fold rule except these (comma-separated names).")
@click.option("--report", "report_path", type=click.Path(), help="Write the full fold + verify report as JSON here.")
def export_command(
    model: str,
    output: str | None,
    static_batch: bool,
    opset: int | None,
    no_verify: bool,
    fp16: bool,
    keep_io_types: bool,
    recalibrate_data: str | None,
    recalibrate_batch_size: int,
    rules: str | None,
    skip_rules: str | None,
    report_path: str | None,
    *,
    loading: ModelOptions,
    input_shape: InputShapeOptions,
    verification: VerifyOptions,
    metadata: MetadataOptions,
) -> None:
    """Fold, export to ONNX and verify MODEL (TorchScript, torch.export, state_dict + --arch, or a trusted pickle)."""
    from bnfold.export import default_output_path, export  # imports torch: only when the command runs
    from bnfold.recalibrate import recalibrate

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
    preprocess = metadata.preprocess(loaded, example)
    recalibration = None
    if recalibrate_data:
        recalibration = recalibrate(
            loaded.module, recalibrate_data, inputs=len(example), batch_size=recalibrate_batch_size, progress=progress
        )
        click.echo(str(recalibration))
    try:
        result = export(
            loaded.module,
            example,
            out,
            dynamic_batch=not static_batch,
            opset=opset,
            verify=not no_verify,
            fp16=fp16,
            keep_io_types=keep_io_types,
            labels=labels,
            preprocess=preprocess,
            source=model,
            progress=progress,
            rules=_names(rules),
            skip_rules=_names(skip_rules),
            **verification.kwargs(),
        )
    except VerificationError as exc:
        if report_path and exc.report is not None:
            write_json(report_path, {"model": model, "passed": False, "verify": exc.report.to_dict()})
        raise
    click.echo(f"Model: {model} ({loaded.format})")
    click.echo(str(result))
    if report_path:
        extra = {"recalibration": recalibration.to_dict()} if recalibration else {}
        write_json(report_path, {"model": model, "format": loaded.format, **result.to_dict(), **extra})
    click.echo(f"Wrote {result.path}")


def _names(value: str | None) -> list[str] | None:
    """A comma-separated option's names."""
    return None if value is None else [name.strip() for name in value.split(",") if name.strip()]
