"""``bnfold`` console script: parses options, calls the library, prints reports.

Errors a user can cause become one line on stderr and the exit code of their class
(see ``bnfold.errors``); ``bnfold --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np
from bnfold.cli.flags import cli_message

from bnfold import __version__
from bnfold.batching import Batch, plan_batches
from bnfold.bench import bench
from bnfold.data import read_arrays, select_inputs
from bnfold.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, BnfoldError, UsageError, VerificationError
from bnfold.export import default_output_path, export
from bnfold.fold import fold
from bnfold.images import find_images
from bnfold.loading import LoadedModel, load_model, parse_shape
from bnfold.metadata import CHANNEL_ORDERS, Preprocess, parse_floats, read_labels
from bnfold.modes import first_line
from bnfold.predictor import DEVICES, CudaUnavailableWarning, Predictor
from bnfold.progress import Progress, for_stream
from bnfold.recalibrate import DEFAULT_BATCH_SIZE, recalibrate
from bnfold.staging import atomic_write, check_output_path
from bnfold.verify import DEFAULT_ATOL, DEFAULT_RTOL, FP16_ATOL, FP16_RTOL, REFERENCES, verify

DEFAULT_PREDICT_BATCH = 32


def _fail(message: str, code: int) -> None:
    click.echo(f"bnfold: error: {message}", err=True)
    sys.exit(code)


def handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn bnfold errors into one stderr line and an exit code; tracebacks only with --debug."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().obj.get("debug", False)
        try:
            return command(*args, **kwargs)
        except BnfoldError as exc:
            if debug:
                raise
            report = getattr(exc, "report", None)
            if isinstance(exc, VerificationError) and report is not None:
                click.echo(str(report))
            _fail(cli_message(str(exc)), exc.exit_code)
        except KeyboardInterrupt:
            if debug:
                raise
            _fail("interrupted; nothing was written", EXIT_INTERRUPTED)
        except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_OK)
        except Exception as exc:  # a bug in bnfold or a library: still one line, unless --debug
            if debug:
                raise
            _fail(
                f"internal error: {first_line(exc, with_type=True)} (re-run as `bnfold --debug ...` for the traceback)",
                EXIT_INTERNAL,
            )

    return wrapper


def model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by every command that reads a PyTorch model file."""
    options = [
        click.option(
            "--arch",
            metavar="MODULE:FACTORY",
            help="Architecture for a state_dict file: package.module:factory or file.py:factory. Its code is imported and run.",
        ),
        click.option(
            "--arch-kwargs",
            metavar="JSON",
            help="Keyword arguments for the --arch factory, as a JSON object, e.g. '{\"num_classes\": 10}'.",
        ),
        click.option(
            "--trust-pickle",
            is_flag=True,
            help="Allow unpickling a whole nn.Module. Unpickling runs code from the file: only for files you trust.",
        ),
        click.option(
            "--input-shape",
            "input_shapes",
            multiple=True,
            metavar="NxCxHxW",
            help="Input shape, batch first (repeat for several inputs). Needed when the file does not record it.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _load(model: str, arch: str | None, arch_kwargs: str | None, trust_pickle: bool) -> LoadedModel:
    """Load ``model``; ``arch_kwargs`` is JSON text here (the library checks what it holds)."""
    kwargs = None
    if arch_kwargs:
        try:
            kwargs = json.loads(arch_kwargs)
        except ValueError as exc:
            raise UsageError(f"--arch-kwargs is not valid JSON: {exc}") from exc
    return load_model(model, arch=arch, arch_kwargs=kwargs, trust_pickle=trust_pickle)


def _preprocess(
    loaded: LoadedModel,
    example: tuple[Any, ...],
    size: str | None,
    mean: str | None,
    std: str | None,
    channels: str | None,
) -> Preprocess | None:
    """The preprocessing to store: the file's, with any --preprocess-* option overriding it."""
    if not any((size, mean, std, channels)) and loaded.preprocess is None:
        return None
    shape = tuple(example[0].shape)
    spec: dict[str, Any] = dataclasses.asdict(loaded.preprocess) if loaded.preprocess else {}
    if size:
        spec["size"] = parse_shape(size, parameter="preprocess.size", example="224x224")
    if mean:
        spec["mean"] = parse_floats(mean, "preprocess.mean")
    if std:
        spec["std"] = parse_floats(std, "preprocess.std")
    if channels:
        spec["channel_order"] = channels
    spec.setdefault("channel_order", "L" if len(shape) == 4 and shape[1] == 1 else "RGB")
    spec.setdefault("size", shape[2:4] if len(shape) == 4 else ())
    spec.setdefault("mean", (0.0,))
    spec.setdefault("std", (1.0,))
    return Preprocess.from_dict(spec)


def _write_json(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON atomically (temp file beside it, then rename); the callers check
    ``path`` before their slow work, naming their option."""
    text = json.dumps(data, indent=2).encode()
    atomic_write(path, lambda fh: fh.write(text))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bnfold")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Fold batch-norm into a trained PyTorch CNN, export it to ONNX and verify it.

    Exit codes: 0 ok, 1 verification failed, 2 usage error, 3 unreadable, unsafe or
    unsupported model, 4 internal error, 5 output could not be written, 130 interrupted.
    """
    ctx.ensure_object(dict)["debug"] = debug


@main.command("export")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option(
    "-o", "--output", type=click.Path(), help="ONNX file to write (default: <model stem>.onnx beside the model)."
)
@model_options
@click.option(
    "--static-batch", is_flag=True, help="Fix the batch size to the input shape's instead of a dynamic batch axis."
)
@click.option("--opset", type=int, help="ONNX opset version (default: the exporter's).")
@click.option(
    "--no-verify",
    is_flag=True,
    help="Skip verification in ONNX Runtime (the BatchNormalization count is still checked).",
)
@click.option(
    "--rtol",
    type=float,
    help=f"Relative tolerance, against max|y_ref| [default: {DEFAULT_RTOL:g}; {FP16_RTOL:g} with --fp16 or a float16 model].",
)
@click.option(
    "--atol",
    type=float,
    help=f"Absolute tolerance [default: {DEFAULT_ATOL:g}; {FP16_ATOL:g} with --fp16 or a float16 model].",
)
@click.option("--inputs", type=click.Path(), help="Verification data: .npy, or .npz with one array per model input.")
@click.option("--fp16", is_flag=True, help="Export float16 weights and activations (folded in float64 first).")
@click.option("--keep-io-types", is_flag=True, help="With --fp16: keep float32 inputs and outputs.")
@click.option(
    "--reference",
    type=click.Choice(REFERENCES),
    default="float32",
    show_default=True,
    help="float64 also reports the error of the original and the ONNX model against a float64 run.",
)
@click.option(
    "--labels", "labels_path", type=click.Path(), help="Class labels, one per line, stored in the ONNX metadata."
)
@click.option(
    "--preprocess-size",
    metavar="HxW",
    help="Image preprocessing stored in the ONNX metadata: resize to HxW (default: the input's).",
)
@click.option(
    "--preprocess-mean",
    metavar="M[,M,M]",
    help="Per-channel mean subtracted after scaling pixels to [0, 1] (default 0).",
)
@click.option("--preprocess-std", metavar="S[,S,S]", help="Per-channel std divided by (default 1).")
@click.option(
    "--preprocess-channels",
    type=click.Choice(CHANNEL_ORDERS),
    help="Channel order: RGB, BGR or L (grayscale); default from the channel count.",
)
@click.option(
    "--recalibrate",
    "recalibrate_data",
    type=click.Path(),
    help="Recompute every batch-norm's running statistics as the exact population statistics of this data (.npy/.npz) before folding.",
)
@click.option(
    "--recalibrate-batch-size",
    type=int,
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Batch size of the recalibration pass.",
)
@click.option("--report", "report_path", type=click.Path(), help="Write the full fold + verify report as JSON here.")
@handle_errors
def export_command(
    model: str,
    output: str | None,
    arch: str | None,
    arch_kwargs: str | None,
    trust_pickle: bool,
    input_shapes: tuple[str, ...],
    static_batch: bool,
    opset: int | None,
    no_verify: bool,
    rtol: float | None,
    atol: float | None,
    inputs: str | None,
    fp16: bool,
    keep_io_types: bool,
    reference: str,
    labels_path: str | None,
    preprocess_size: str | None,
    preprocess_mean: str | None,
    preprocess_std: str | None,
    preprocess_channels: str | None,
    recalibrate_data: str | None,
    recalibrate_batch_size: int,
    report_path: str | None,
) -> None:
    """Fold, export to ONNX and verify MODEL (TorchScript, torch.export, state_dict + --arch, or a trusted pickle)."""
    shapes = [parse_shape(s) for s in input_shapes]
    out = Path(output) if output else default_output_path(model)
    check_output_path(out, model if Path(model).exists() else None)
    if report_path:
        check_output_path(report_path, model if Path(model).exists() else None, option="--report")
    if keep_io_types and not fp16:  # checked before any slow step
        raise UsageError("--keep-io-types only applies with --fp16")
    if (rtol is not None and rtol < 0) or (atol is not None and atol < 0):
        raise UsageError(f"--rtol/--atol must be non-negative (got rtol={rtol}, atol={atol})")
    progress = for_stream(sys.stderr)
    progress.start(f"Loading {model}")
    loaded = _load(model, arch, arch_kwargs, trust_pickle)
    progress.finish()
    example = loaded.example_inputs(shapes)
    labels = read_labels(labels_path) if labels_path else loaded.labels
    preprocess = _preprocess(loaded, example, preprocess_size, preprocess_mean, preprocess_std, preprocess_channels)
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
            rtol=rtol,
            atol=atol,
            inputs=inputs,
            fp16=fp16,
            keep_io_types=keep_io_types,
            reference=reference,
            labels=labels,
            preprocess=preprocess,
            source=model,
            progress=progress,
        )
    except VerificationError as exc:
        if report_path and exc.report is not None:
            _write_json(report_path, {"model": model, "passed": False, "verify": exc.report.to_dict()})
        raise
    click.echo(f"Model: {model} ({loaded.format})")
    click.echo(str(result))
    if report_path:
        extra = {"recalibration": recalibration.to_dict()} if recalibration else {}
        _write_json(report_path, {"model": model, "format": loaded.format, **result.to_dict(), **extra})
    click.echo(f"Wrote {result.path}")


@main.command("inspect")
@click.argument("model", type=click.Path(dir_okay=True))
@model_options
@click.option("--static-batch", is_flag=True, help="Trace with a fixed batch size.")
@click.option("--json", "as_json", is_flag=True, help="Print the fold report as JSON.")
@handle_errors
def inspect_command(
    model: str,
    arch: str | None,
    arch_kwargs: str | None,
    trust_pickle: bool,
    input_shapes: tuple[str, ...],
    static_batch: bool,
    as_json: bool,
) -> None:
    """List every batch-norm of MODEL and what export would do with it, without exporting."""
    shapes = [parse_shape(s) for s in input_shapes]
    loaded = _load(model, arch, arch_kwargs, trust_pickle)
    inputs = loaded.example_inputs(shapes)
    report = fold(loaded.module, inputs, dynamic_batch=not static_batch).report
    if as_json:
        click.echo(
            json.dumps(
                {
                    "model": model,
                    "format": loaded.format,
                    "input_shapes": [list(t.shape) for t in inputs],
                    **report.to_dict(),
                },
                indent=2,
            )
        )
        return
    click.echo(
        f"Model: {model} ({loaded.format}); input shape(s): {', '.join('x'.join(map(str, t.shape)) for t in inputs)}"
    )
    click.echo(str(report))


@main.command("verify")
@click.argument("model", type=click.Path(dir_okay=True))
@click.argument("onnx_model", type=click.Path(dir_okay=True))
@model_options
@click.option(
    "--rtol",
    type=float,
    help=f"Relative tolerance, against max|y_ref| [default: {DEFAULT_RTOL:g}; {FP16_RTOL:g} for float16 models].",
)
@click.option(
    "--atol", type=float, help=f"Absolute tolerance [default: {DEFAULT_ATOL:g}; {FP16_ATOL:g} for float16 models]."
)
@click.option("--inputs", type=click.Path(), help="Verification data: .npy, or .npz with one array per model input.")
@click.option(
    "--reference",
    type=click.Choice(REFERENCES),
    default="float32",
    show_default=True,
    help="float64 also reports the error of the original and the ONNX model against a float64 run.",
)
@click.option("--report", "report_path", type=click.Path(), help="Write the verify report as JSON here.")
@handle_errors
def verify_command(
    model: str,
    onnx_model: str,
    arch: str | None,
    arch_kwargs: str | None,
    trust_pickle: bool,
    input_shapes: tuple[str, ...],
    rtol: float | None,
    atol: float | None,
    inputs: str | None,
    reference: str,
    report_path: str | None,
) -> None:
    """Check that ONNX_MODEL in ONNX Runtime matches MODEL in eval mode; exit 1 if it does not."""
    if input_shapes:
        raise UsageError("--input-shape is not used by verify: shapes come from the ONNX model (or --inputs)")
    if report_path:
        check_output_path(report_path, option="--report")
    loaded = _load(model, arch, arch_kwargs, trust_pickle)
    report = verify(
        loaded.module, onnx_model, inputs, rtol=rtol, atol=atol, reference=reference, progress=for_stream(sys.stderr)
    )
    click.echo(str(report))
    if report_path:
        _write_json(report_path, {"model": model, **report.to_dict()})
    if not report.passed:
        _fail(f"verification failed: {'; '.join(report.failures())}", VerificationError.exit_code)


@main.command("bench")
@click.argument("model", type=click.Path(dir_okay=True))
@model_options
@click.option("--batch-sizes", default="1,32", show_default=True, metavar="B[,B...]", help="Batch sizes to time.")
@click.option(
    "--repeats",
    type=int,
    default=10,
    show_default=True,
    help="Timed runs per variant and batch size (after 2 warm-up runs).",
)
@click.option("--json", "json_path", type=click.Path(), help="Also write the medians and ratios as JSON here.")
@handle_errors
def bench_command(
    model: str,
    arch: str | None,
    arch_kwargs: str | None,
    trust_pickle: bool,
    input_shapes: tuple[str, ...],
    batch_sizes: str,
    repeats: int,
    json_path: str | None,
) -> None:
    """Time MODEL eager (original, folded, BN-free floor) and in ONNX Runtime (plain torch.onnx.export
    vs bnfold, optimizations on and off) on the CPU; prints medians and ratios."""
    sizes = list(parse_shape(batch_sizes, parameter="batch_sizes", example="1,32"))
    if repeats < 1:
        raise UsageError(f"--repeats {repeats}: must be at least 1")
    if json_path:
        check_output_path(json_path, option="--json")
    loaded = _load(model, arch, arch_kwargs, trust_pickle)
    example = loaded.example_inputs([parse_shape(s) for s in input_shapes])
    report = bench(
        loaded.module, example, name=model, batch_sizes=sizes, repeats=repeats, progress=for_stream(sys.stderr)
    )
    click.echo(str(report))
    if json_path:
        _write_json(json_path, report.to_dict())


@main.command("predict")
@click.argument("onnx_model", type=click.Path(dir_okay=True))
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(), help="Write all outputs to this .npz (one array per model output).")
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
@handle_errors
def predict_command(
    onnx_model: str,
    inputs: tuple[str, ...],
    output: str | None,
    device: str,
    batch_size: int,
    top_k: int,
    as_json: bool,
) -> None:
    """Run ONNX_MODEL on INPUTS: a .npy/.npz file, or image files and folders of images (with
    the preprocessing the model was exported with)."""
    if top_k < 1:
        raise UsageError(f"--top-k {top_k}: must be at least 1")
    if output:
        check_output_path(output)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CudaUnavailableWarning)
        predictor = Predictor(onnx_model, device=device, batch_size=batch_size)
    for warning in caught:
        click.echo(f"bnfold: warning: {warning.message}", err=True)
    names, predict_batch = _prediction_source(predictor, inputs)
    plan = plan_batches(len(names), batch_size)
    progress = for_stream(sys.stderr) if len(plan) > 3 else Progress()
    progress.start(f"Predicting {len(names)} sample(s) on {predictor.device}")
    parts: list[dict[str, np.ndarray]] = []
    for batch in plan:
        result = predict_batch(batch)
        parts.append(result if isinstance(result, dict) else {predictor.outputs[0].name: result})
        progress.advance(batch.rows.stop, len(names))
    progress.finish()
    outputs = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if output:
        _write_npz(output, outputs)
    _print_predictions(next(iter(outputs.values())), names, predictor.labels, top_k, as_json)
    if output and not as_json:
        click.echo(f"Wrote {output}")


def _prediction_source(predictor: Predictor, inputs: tuple[str, ...]) -> tuple[list[str], Callable[[Batch], Any]]:
    """(sample names, the predictions for a batch of them): the arrays of one .npy/.npz file, or
    image files and folders read with the model's preprocessing."""
    if len(inputs) == 1 and Path(inputs[0]).suffix.lower() in (".npy", ".npz"):
        arrays = select_inputs(read_arrays(inputs[0], "INPUT"), [s.name for s in predictor.inputs], inputs[0])
        named = {s.name: a for s, a in zip(predictor.inputs, arrays)}
        return [str(i) for i in range(arrays[0].shape[0])], lambda batch: predictor.predict(batch.take(named))
    paths = [p for item in inputs for p in find_images(item)]
    return [str(p) for p in paths], lambda batch: predictor.predict_images(paths[batch.rows])


def _write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` atomically (temp file beside it, then rename)."""
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def _print_predictions(
    scores: np.ndarray, names: list[str], labels: list[str] | None, top_k: int, as_json: bool
) -> None:
    if scores.ndim != 2:
        if as_json:
            for name, row in zip(names, scores):
                click.echo(json.dumps({"sample": name, "shape": list(row.shape)}))
        else:
            click.echo(f"{len(names)} sample(s): output shape {'x'.join(map(str, scores.shape))}")
        return
    k = min(top_k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    for name, row, idx in zip(names, scores, top):
        best = [
            {"class": int(j), "label": labels[j] if labels and j < len(labels) else str(int(j)), "score": float(row[j])}
            for j in idx
        ]
        if as_json:
            click.echo(json.dumps({"sample": name, "top_k": best}))
        else:
            click.echo(f"{name}\t" + ", ".join(f"{b['label']} ({b['score']:.4g})" for b in best))


if __name__ == "__main__":  # pragma: no cover
    main()
