"""``bnfold verify``: compare an ONNX file in ONNX Runtime with the PyTorch model it came from."""

from __future__ import annotations

import sys

import click
from bnfold.cli.options import (
    InputShapeOptions,
    ModelOptions,
    VerifyOptions,
    input_shape_options,
    model_options,
    verify_options,
)
from bnfold.cli.output import write_json

from bnfold.errors import UsageError, VerificationError
from bnfold.progress import for_stream
from bnfold.staging import check_output_path


@click.command("verify")
@click.argument("model", type=click.Path(dir_okay=True))
@click.argument("onnx_model", type=click.Path(dir_okay=True))
@model_options
@input_shape_options
@verify_options(float16_when="for float16 models")
@click.option("--report", "report_path", type=click.Path(), help="Write the verify report as JSON here.")
def verify_command(
    model: str,
    onnx_model: str,
    report_path: str | None,
    *,
    loading: ModelOptions,
    input_shape: InputShapeOptions,
    verification: VerifyOptions,
) -> None:
    """Check that ONNX_MODEL in ONNX Runtime matches MODEL in eval mode; exit 1 if it does not."""
    from bnfold.verification import verify  # imports torch: only when the command runs

    if input_shape.input_shapes:
        raise UsageError("--input-shape is not used by verify: shapes come from the ONNX model (or --inputs)")
    if report_path:
        check_output_path(report_path, option="--report")
    loaded = loading.load(model)
    report = verify(loaded.module, onnx_model, progress=for_stream(sys.stderr), **verification.kwargs())
    click.echo(str(report))
    if report_path:
        write_json(report_path, {"model": model, **report.to_dict()})
    if not report.passed:
        raise VerificationError(f"verification failed: {'; '.join(report.failures())}")
