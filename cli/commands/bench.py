"""``bnfold bench``: time a model eager and in ONNX Runtime, folded and not."""

from __future__ import annotations

import sys

import click
from bnfold.cli.options import InputShapeOptions, ModelOptions, input_shape_options, model_options
from bnfold.cli.output import write_json

from bnfold.progress import for_stream
from bnfold.shapes import parse_shape
from bnfold.staging import check_output_path


@click.command("bench")
@click.argument("model", type=click.Path(dir_okay=True))
@model_options
@input_shape_options
@click.option("--batch-sizes", default="1,32", show_default=True, metavar="B[,B...]", help="Batch sizes to time.")
@click.option(
    "--repeats",
    type=int,
    default=10,
    show_default=True,
    help="Timed runs per variant and batch size (after 2 warm-up runs).",
)
@click.option(
    "--int8",
    is_flag=True,
    help="Also time bnfold's ONNX quantized to INT8 as `bnfold export --int8` quantizes it (no accuracy check), "
    "and compare the file sizes.",
)
@click.option(
    "--calibration", type=click.Path(), help="With --int8: calibration data (.npy/.npz), split as by bnfold export."
)
@click.option("--json", "json_path", type=click.Path(), help="Also write the medians and ratios as JSON here.")
def bench_command(
    model: str,
    batch_sizes: str,
    repeats: int,
    int8: bool,
    calibration: str | None,
    json_path: str | None,
    *,
    loading: ModelOptions,
    input_shape: InputShapeOptions,
) -> None:
    """Time MODEL eager (original, folded, BN-free floor) and in ONNX Runtime (plain torch.onnx.export
    vs bnfold, optimizations on and off; with --int8 also bnfold's INT8 model) on the CPU; prints
    medians and ratios."""
    from bnfold.bench import bench  # imports torch: only when the command runs

    sizes = list(parse_shape(batch_sizes, parameter="batch_sizes", example="1,32"))
    shapes = input_shape.shapes()
    if json_path:
        check_output_path(json_path, option="--json")
    loaded = loading.load(model)
    example = loaded.example_inputs(shapes)
    report = bench(
        loaded.module,
        example,
        name=model,
        batch_sizes=sizes,
        repeats=repeats,
        progress=for_stream(sys.stderr),
        int8=int8,
        calibration=calibration,
    )
    click.echo(str(report))
    if json_path:
        write_json(json_path, report.to_dict())
