"""Export a folded module to ONNX (dynamic batch, metadata), verify it, and write it atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from onnxscript import ir
from torch import fx, nn
from torch.export import ExportedProgram

from . import __version__
from .errors import BnfoldError, ExportError, Param, Part, UsageError, VerificationError, first_line
from .export_options import ExportOptions
from .folding import fold
from .folding.capture import CAPTURE_BATCH, dynamic_shapes, with_batch
from .folding.precision import to_float16, with_float32_io
from .image_sizes import ImageSizes
from .metadata import (
    FOLD_REPORT_KEY,
    INPUT_NAMES_KEY,
    OUTPUT_NAMES_KEY,
    VERSION_KEY,
    WEIGHT_DTYPE_KEY,
    Preprocess,
    image_size_props,
    int8_props,
    metadata_props,
)
from .onnx_ir import count_ops, onnx_opset, tensor_bytes, weight_dtype
from .onnx_writer import release_weights
from .progress import Progress
from .report import ExportResult, FoldReport
from .staging import (
    EXTERNAL_DATA_THRESHOLD,
    Staged,
    check_output_path,
    collect_garbage,
    interrupts_held,
    write_failed,
)
from .user_module import module_dtype, quiet_torch
from .verification import default_tolerances
from .verification import verify as verify_onnx


def output_count(module: fx.GraphModule | ExportedProgram) -> int:
    """Number of tensors a captured module or program returns."""
    return len(torch.utils._pytree.tree_leaves(module.graph.output_node().args[0]))


def to_onnx(
    model: fx.GraphModule | ExportedProgram,
    example_inputs: Sequence[torch.Tensor],
    *,
    outputs: int,
    dynamic_batch: bool,
    opset: int | None,
    dynamic_size: bool = False,
) -> ir.Model:
    """Translate a (folded) program or module with ``outputs`` outputs to ONNX (dynamo exporter),
    as the exporter's ONNX IR model: its initializers share memory with ``model``'s tensors.

    A program is translated as captured, without tracing the model again (its batch axis is
    already symbolic when captured with a dynamic batch); a module is traced by the exporter, with
    free heights and widths of image-like inputs too when ``dynamic_size``.
    """
    inputs = with_batch(example_inputs, CAPTURE_BATCH) if dynamic_batch else tuple(example_inputs)
    names = ["output"] if outputs == 1 else [f"output_{i}" for i in range(outputs)]
    traced_again = (dynamic_batch or dynamic_size) and not isinstance(model, ExportedProgram)
    try:
        with quiet_torch():
            program = torch.onnx.export(
                model,
                inputs,
                dynamo=True,
                dynamic_shapes=dynamic_shapes(model, inputs, batch=dynamic_batch, size=dynamic_size)
                if traced_again
                else None,
                opset_version=opset,
                output_names=names,
                verbose=False,
                optimize=True,
            )
    except Exception as exc:
        hint = (f" (opset {opset} may be unsupported; leave ", Param("opset"), " unset)") if opset else ()
        raise ExportError("torch.onnx.export failed", *hint, f": {type(exc).__name__}: {first_line(exc)}") from exc
    model = program.model
    used = onnx_opset(model)
    if opset is not None and used != opset:
        raise UsageError(
            Param("opset"),
            f" {opset}: torch's exporter produced opset {used} instead (it could not convert this "
            f"model to opset {opset}); choose opset {used} or newer, or leave ",
            Param("opset"),
            " unset",
        )
    return model


def _check_preprocess(preprocess: Preprocess | None, example_inputs: Sequence[torch.Tensor]) -> None:
    if preprocess is None:
        return
    shape = tuple(example_inputs[0].shape)
    if len(shape) != 4 or shape[1] != preprocess.channels:
        raise UsageError(
            Param("preprocess.channel_order"),
            f": images give {preprocess.channels}-channel NxCxHxW input, the model takes {'x'.join(map(str, shape))}",
        )


def _check_image_size(preprocess: Preprocess | None, sizes: Sequence[ImageSizes | None] | None) -> None:
    """The stored preprocessing must give images the model takes: a fixed size it allows, or each
    image's own size (``preprocess.size`` ``None``) for a dynamic-size model."""
    rule = sizes[0] if sizes else None
    if preprocess is None or preprocess.size is None or rule is None:
        return
    problem = rule.problem(*preprocess.size)
    if problem:
        raise UsageError(Param("preprocess.size"), f" {preprocess.size[0]}x{preprocess.size[1]}: {problem}")


def _sizes_by_name(model: ir.Model, sizes: Sequence[ImageSizes | None] | None) -> dict[str, ImageSizes]:
    """The image sizes of the dynamic-size inputs by ONNX input name; an :class:`ExportError` if
    the exporter fixed a height or width the capture left free."""
    if not sizes:
        return {}
    named = {value.name: rule for value, rule in zip(model.graph.inputs, sizes) if rule is not None}
    for value in model.graph.inputs:
        if value.name in named and value.shape is not None and any(isinstance(d, int) for d in value.shape[2:]):
            raise ExportError(
                f"torch.onnx.export fixed the size of input '{value.name}' ({value.shape}) although the model "
                "takes other sizes; export without ",
                Param("dynamic_size", True),
            )
    return named


def _check_labels(model: ir.Model, labels: Sequence[str] | None) -> None:
    if not labels:
        return
    shape = model.graph.outputs[0].shape
    classes = shape[1] if shape is not None and len(shape) >= 2 and isinstance(shape[1], int) else None
    if classes is not None and classes != len(labels):
        raise UsageError(
            Param("labels"), f": {len(labels)} label(s), but the model's first output has {classes} classes"
        )


def _add_metadata(model: ir.Model, report: FoldReport, extra: dict[str, str]) -> None:
    model.metadata_props.update(
        {
            **extra,
            VERSION_KEY: __version__,
            FOLD_REPORT_KEY: json.dumps(
                {k: v for k, v in report.to_dict().items() if k != "entries"}, separators=(",", ":")
            ),
            INPUT_NAMES_KEY: json.dumps([v.name for v in model.graph.inputs]),
            OUTPUT_NAMES_KEY: json.dumps([v.name for v in model.graph.outputs]),
            WEIGHT_DTYPE_KEY: weight_dtype(model),
        }
    )


def _dtype_hint(module: nn.Module) -> tuple[Part, ...]:
    dtype = module_dtype(module)
    if dtype in (torch.float32, torch.float16):
        return ()
    return (
        f" (the model is {dtype}: ONNX Runtime on the CPU runs float32 and float16; convert the model to float32 "
        "or pass ",
        Param("verify", False),
        ")",
    )


def default_output_path(model_path: str | os.PathLike[str]) -> Path:
    """``<input stem>.onnx`` beside the input."""
    return Path(model_path).with_suffix(".onnx")


def export(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path: str | os.PathLike[str],
    options: ExportOptions | None = None,
    *,
    source: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    **fields: Any,
) -> ExportResult:
    """Fold ``module``'s batch-norms, export it to ONNX at ``path`` and verify it.

    ``options`` (an :class:`ExportOptions`, default: all defaults) says how; its fields may also
    be given as keywords, which replace those of ``options`` (``export(m, x, p, fp16=True)``).

    The file is written to a temporary name beside ``path`` and renamed only after it passed
    verification (and the BatchNormalization count check), so ``path`` never holds an
    unverified model. A model whose tensors exceed :data:`EXTERNAL_DATA_THRESHOLD` bytes is
    written with external data (``<path>.data``, moved into place before ``path``). A write
    failure (disk full, read-only file system) is an :class:`OutputError`. A failed verification
    raises :class:`VerificationError` carrying the report. ``source`` (the model file) is
    refused as an output path.

    ``fp16`` folds first (float64 math, float32 weights), checks every stored tensor fits float16,
    then converts. Verification's tolerances default to the float32 or float16 ones (see
    :mod:`bnfold.verification`).

    ``int8`` quantizes the verified float32 file with ONNX Runtime's static quantization,
    calibrated on part of ``calibration``, checks it against ``module`` on the rest, leaves the
    most sensitive layers in float when it misses the budget (see :mod:`bnfold.quantization`),
    and writes the INT8 model at ``path`` only if it then meets it: ``result.int8_report`` says
    how; a missed budget raises :class:`VerificationError` carrying that report.
    """
    options = dataclasses.replace(options or ExportOptions(), **fields)
    if options.int8 and module_dtype(module) != torch.float32:
        raise UsageError(
            Param("int8", True),
            f" quantizes a float32 model; this one is {module_dtype(module)}: convert it to float32",
        )
    low_precision = options.fp16 or module_dtype(module) in (torch.float16, torch.bfloat16)
    rtol, atol = default_tolerances(low_precision, options.rtol, options.atol)
    progress = progress or Progress()
    out = check_output_path(path, source)
    with contextlib.ExitStack() as cleanup:  # the temporary file goes, whatever happens
        result, staged = _fold_and_write(module, example_inputs, out, cleanup, options, progress)
        if options.verify:
            # The folded graph and the exporter's program (reference cycles) hold a copy of the
            # weights; free it before ONNX Runtime loads the file, so the two never share the peak.
            collect_garbage()
            try:
                report = verify_onnx(
                    module,
                    staged.path,
                    options.inputs,
                    rtol=rtol,
                    atol=atol,
                    reference=options.reference,
                    progress=progress,
                )
            except BnfoldError as exc:  # name the target, not the temporary file
                raise exc.reworded(lambda text: text.replace(str(staged.path), str(out)), *_dtype_hint(module)) from exc
            report.onnx_path = str(out)
            result.verify_report = report
            if not report.passed:
                raise VerificationError(
                    f"verification failed, {out} was not written: " + "; ".join(report.failures()), report=report
                )
        # The exporter's optimizer may fuse a batch-norm the fold kept (one whose rewrite the
        # proof undid) into its conv: fewer nodes are checked by verification, more are an error.
        kept = result.fold_report.kept_batchnorm_ops
        if result.onnx_batchnorm_count > kept:
            raise VerificationError(
                f"the ONNX graph has {result.onnx_batchnorm_count} BatchNormalization node(s) but the fold "
                f"report keeps {kept}; the export is inconsistent and was not written",
                report=result.verify_report,
            )
        if options.int8:
            staged = _quantized(module, staged, out, cleanup, options, result, progress)
        staged.commit(source)
    return result


def _quantized(
    module: nn.Module,
    fp32: Staged,
    out: Path,
    cleanup: contextlib.ExitStack,
    options: ExportOptions,
    result: ExportResult,
    progress: Progress,
) -> Staged:
    """The verified float32 file ``fp32`` quantized to INT8 into another staged file beside
    ``out``, checked against ``module`` within the accuracy budget, with its INT8 facts in the
    metadata; ``result.int8_report`` says how. A missed budget is a :class:`VerificationError`."""
    from .quantization import quantize_within_budget  # ONNX Runtime's quantization tool: only for INT8

    with interrupts_held():
        staged = Staged(out, external=False)
        cleanup.callback(staged.cleanup)
    try:
        report = quantize_within_budget(module, fp32.path, staged.path, options, progress)
    except BnfoldError as exc:  # name the target, not the temporary files
        raise exc.reworded(
            lambda text: text.replace(str(fp32.path), str(out)).replace(str(staged.path), str(out))
        ) from exc
    result.int8_report = report
    if not report.passed:
        raise VerificationError(
            f"the INT8 model misses the accuracy budget, {out} was not written: " + "; ".join(report.failures()),
            report=report,
        )
    model = onnx.load(str(staged.path))
    onnx.helper.set_model_props(
        model, {**{p.key: p.value for p in model.metadata_props}, **int8_props(report.summary())}
    )
    try:
        onnx.save(model, str(staged.path))
    except OSError as exc:
        raise write_failed(out, exc) from exc
    return staged


def _fold_and_write(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    out: Path,
    cleanup: contextlib.ExitStack,
    options: ExportOptions,
    progress: Progress,
) -> tuple[ExportResult, Staged]:
    """Fold, export and write the ONNX file to a temporary name beside ``out``: the result so
    far (no verification yet) and the staged file, which the caller commits; its removal is
    registered on ``cleanup`` as soon as it exists. Only the small result leaves this function:
    the folded module and the ONNX IR die with it."""
    folded = fold(
        module,
        example_inputs,
        dynamic_batch=options.dynamic_batch,
        dynamic_size=options.dynamic_size,
        rules=options.rules,
        skip_rules=options.skip_rules,
        progress=progress,
    )
    _check_preprocess(options.preprocess, example_inputs)
    _check_image_size(options.preprocess, folded.report.image_sizes)
    progress.start("Exporting to ONNX")
    exported, example = folded.program, tuple(example_inputs)
    if options.fp16:  # float16 weights change the graph's dtypes: convert the module, the exporter traces it
        exported = to_float16(folded.module)
        if options.keep_io_types:
            exported = with_float32_io(exported)
        else:
            example = tuple(x.half() if x.is_floating_point() else x for x in example)
    model = to_onnx(
        exported,
        example,
        outputs=output_count(exported),
        dynamic_batch=options.dynamic_batch,
        opset=options.opset,
        dynamic_size=options.dynamic_size,
    )
    report = folded.report
    del folded, exported  # the IR shares the folded weights; nothing else may keep them alive
    try:  # drop the IR's weights on every path (onnxscript keeps the graph alive, see release_weights)
        _check_labels(model, options.labels)
        sizes = image_size_props(_sizes_by_name(model, report.image_sizes))
        _add_metadata(model, report, metadata_props(list(options.labels or ()) or None, options.preprocess) | sizes)
        result = ExportResult(
            path=str(out),
            fold_report=report,
            verify_report=None,
            onnx_batchnorm_count=count_ops(model, "BatchNormalization"),
            opset=onnx_opset(model),
            input_names=[v.name for v in model.graph.inputs],
            output_names=[v.name for v in model.graph.outputs],
        )
        with interrupts_held():  # the temporary file never exists without its removal registered
            staged = Staged(out, external=tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD)
            cleanup.callback(staged.cleanup)
        staged.save(model)
    finally:
        release_weights(model)
    progress.finish()
    return result, staged
