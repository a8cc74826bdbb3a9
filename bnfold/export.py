"""Export a folded module to ONNX (dynamic batch, metadata), verify it, and write it atomically."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

import torch
from onnxscript import ir
from torch import fx, nn
from torch.export import ExportedProgram

from . import __version__
from .errors import BnfoldError, ExportError, OutputError, UsageError, VerificationError
from .fold import fold
from .fold.capture import CAPTURE_BATCH, batch_dynamic_shapes, with_batch
from .fold.precision import to_float16, with_float32_io
from .metadata import Preprocess, metadata_props
from .modes import first_line, module_dtype, quiet_torch
from .onnx_ir import count_ops, onnx_opset, tensor_bytes, weight_dtype
from .onnx_writer import release_weights, save_with_external_data, write_model
from .progress import Progress
from .report import ExportResult, FoldReport
from .verify import WEIGHT_DTYPE_KEY, InputsArg, default_tolerances
from .verify import verify as verify_onnx

# Protobuf cannot serialize a message of 2 GiB or more: models whose tensors exceed this many bytes
# are written with their tensors in a separate file, ``<name>.onnx.data`` beside ``<name>.onnx``.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


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
) -> ir.Model:
    """Translate a (folded) program or module with ``outputs`` outputs to ONNX (dynamo exporter),
    as the exporter's ONNX IR model: its initializers share memory with ``model``'s tensors.

    A program is translated as captured, without tracing the model again (its batch axis is
    already symbolic when captured with a dynamic batch); a module is traced by the exporter.
    """
    inputs = with_batch(example_inputs, CAPTURE_BATCH) if dynamic_batch else tuple(example_inputs)
    names = ["output"] if outputs == 1 else [f"output_{i}" for i in range(outputs)]
    traced_again = dynamic_batch and not isinstance(model, ExportedProgram)
    try:
        with quiet_torch():
            program = torch.onnx.export(
                model,
                inputs,
                dynamo=True,
                dynamic_shapes=batch_dynamic_shapes(model, inputs) if traced_again else None,
                opset_version=opset,
                output_names=names,
                verbose=False,
                optimize=True,
            )
    except Exception as exc:
        hint = f" (opset {opset} may be unsupported; leave `opset` unset)" if opset else ""
        raise ExportError(f"torch.onnx.export failed{hint}: {type(exc).__name__}: {first_line(exc)}") from exc
    model = program.model
    used = onnx_opset(model)
    if opset is not None and used != opset:
        raise UsageError(
            f"`opset` {opset}: torch's exporter produced opset {used} instead (it could not convert this "
            f"model to opset {opset}); choose opset {used} or newer, or leave `opset` unset"
        )
    return model


def _check_preprocess(preprocess: Preprocess | None, example_inputs: Sequence[torch.Tensor]) -> None:
    if preprocess is None:
        return
    shape = tuple(example_inputs[0].shape)
    if len(shape) != 4 or shape[1] != preprocess.channels:
        raise UsageError(
            f"`preprocess.channel_order`: images give {preprocess.channels}-channel NxCxHxW input, "
            f"the model takes {'x'.join(map(str, shape))}"
        )


def _check_labels(model: ir.Model, labels: Sequence[str] | None) -> None:
    if not labels:
        return
    shape = model.graph.outputs[0].shape
    classes = shape[1] if shape is not None and len(shape) >= 2 and isinstance(shape[1], int) else None
    if classes is not None and classes != len(labels):
        raise UsageError(f"`labels`: {len(labels)} label(s), but the model's first output has {classes} classes")


def _add_metadata(model: ir.Model, report: FoldReport, extra: dict[str, str]) -> None:
    model.metadata_props.update(
        {
            **extra,
            "bnfold_version": __version__,
            "bnfold_fold_report": json.dumps(
                {k: v for k, v in report.to_dict().items() if k != "entries"}, separators=(",", ":")
            ),
            "bnfold_input_names": json.dumps([v.name for v in model.graph.inputs]),
            "bnfold_output_names": json.dumps([v.name for v in model.graph.outputs]),
            WEIGHT_DTYPE_KEY: weight_dtype(model),
        }
    )


def _dtype_hint(module: nn.Module) -> str:
    dtype = module_dtype(module)
    if dtype in (torch.float32, torch.float16):
        return ""
    return f" (the model is {dtype}: ONNX Runtime on the CPU runs float32 and float16; convert the model to float32 or pass `verify=False`)"


def check_output_path(
    path: str | os.PathLike[str], source: str | os.PathLike[str] | None = None, option: str = "`path`"
) -> Path:
    """The output path, checked: its folder exists and is writable, it is not the input, and it
    is a regular file if it exists (writing "onto" a device such as /dev/full would replace it)."""
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"output folder {folder} does not exist; create it or choose another {option}")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"output folder {folder} is not writable; choose another {option}")
    if out.is_dir():
        raise UsageError(f"output {out} is a directory; give a file name such as {out / 'model.onnx'}")
    if out.exists() and not out.is_file():
        raise UsageError(
            f"output {out} exists and is not a regular file (a device, pipe or socket); choose another {option}"
        )
    if source is not None and out.exists() and Path(source).exists() and os.path.samefile(out, source):
        raise UsageError(f"output {out} is the input model file; choose another {option}")
    return out


def external_data_path(out: str | os.PathLike[str]) -> Path:
    """Where the tensors of a model written with external data go: ``<out>.data`` beside ``out``."""
    out = Path(out)
    return out.with_name(out.name + ".data")


def _write_failed(out: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc)
    return OutputError(f"cannot write {out}: {reason}; nothing was written. Free some space or write elsewhere")


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Write a file through ``write(fh)`` to a temporary file beside ``path``, then rename it.

    ``path`` holds either its old content or the complete new one; an :class:`OutputError` (disk
    full, read-only file system) or an interrupt leaves no temporary file behind.
    """
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise _write_failed(target, exc) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, target)
    except OSError as exc:
        raise _write_failed(target, exc) from exc
    finally:
        Path(tmp).unlink(missing_ok=True)


class _Staged:
    """An ONNX file written under a temporary name in the target's folder, moved into place by
    :meth:`commit` only. A model over :data:`EXTERNAL_DATA_THRESHOLD` is written with external
    data into a temporary folder; :meth:`commit` moves the data file first and the ``.onnx``
    last, so a complete model appears under the target name or nothing does."""

    def __init__(self, out: Path, external: bool) -> None:
        self.out, self.external = out, external
        prefix = f".{out.name}."
        try:
            if external:
                self.folder: Path | None = Path(tempfile.mkdtemp(dir=out.parent, prefix=prefix, suffix=".tmp"))
                self.path = self.folder / out.name
            else:
                fd, name = tempfile.mkstemp(dir=out.parent, prefix=prefix, suffix=".tmp")
                os.close(fd)
                self.folder, self.path = None, Path(name)
        except OSError as exc:
            raise _write_failed(out, exc) from exc

    def save(self, model: ir.Model) -> None:
        """Serialize ``model`` to the temporary location (tensors to ``<name>.data`` if external)."""
        try:
            if self.external:
                save_with_external_data(model, self.path, external_data_path(self.out).name)
            else:
                with open(self.path, "wb") as fh:
                    write_model(model, fh)
        except OSError as exc:
            raise _write_failed(self.out, exc) from exc
        except ValueError as exc:
            raise ExportError(f"cannot serialize the ONNX model for {self.out}: {exc}") from exc

    def commit(self, source: str | os.PathLike[str] | None) -> None:
        """Move the verified model into place: the data file (if any) first, the ``.onnx`` last."""
        data = external_data_path(self.out)
        if (
            self.external
            and source is not None
            and data.exists()
            and Path(source).exists()
            and os.path.samefile(data, source)
        ):
            raise UsageError(f"the external data file {data} would overwrite the input model; choose another `path`")
        try:
            if self.external:
                os.replace(self.path.with_name(data.name), data)
            try:
                os.replace(self.path, self.out)
            except OSError:
                if self.external:
                    data.unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise _write_failed(self.out, exc) from exc

    def cleanup(self) -> None:
        """Remove whatever is left of the temporary file or folder."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        else:
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C until the block is done, then raise it: for steps that must not be cut in
    two (creating a temporary file and registering its removal), and for ``gc.collect()``, where
    a ``KeyboardInterrupt`` raised inside a finalizer is printed and ignored by Python. Outside
    the main thread, or under a non-default SIGINT handler, the block just runs."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def collect_garbage() -> None:
    """``gc.collect()`` with Ctrl-C held (see :func:`interrupts_held`)."""
    with interrupts_held():
        gc.collect()


def default_output_path(model_path: str | os.PathLike[str]) -> Path:
    """``<input stem>.onnx`` beside the input."""
    return Path(model_path).with_suffix(".onnx")


def export(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    verify: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    inputs: InputsArg = None,
    fp16: bool = False,
    keep_io_types: bool = False,
    reference: str = "float32",
    labels: Sequence[str] | None = None,
    preprocess: Preprocess | None = None,
    source: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Fold ``module``'s batch-norms, export it to ONNX at ``path`` and verify it.

    The file is written to a temporary name beside ``path`` and renamed only after it passed
    verification (and the BatchNormalization count check), so ``path`` never holds an
    unverified model. A model whose tensors exceed :data:`EXTERNAL_DATA_THRESHOLD` bytes is
    written with external data (``<path>.data``, moved into place before ``path``). A write
    failure (disk full, read-only file system) is an :class:`OutputError`. A failed verification
    raises :class:`VerificationError` carrying the report. ``source`` (the model file) is
    refused as an output path.

    ``fp16`` folds first (float64 math, float32 weights), checks every stored tensor fits float16,
    then converts; inputs and outputs are float16 unless ``keep_io_types``. ``rtol``/``atol``
    default to the float32 or float16 tolerances (see :mod:`bnfold.verify`); ``reference`` is
    passed to :func:`bnfold.verify`. ``labels`` (one per class of the first output) and
    ``preprocess`` are stored in the ONNX metadata for :class:`bnfold.Predictor`.
    """
    if keep_io_types and not fp16:
        raise UsageError("`keep_io_types=True` only applies with `fp16=True`")
    low_precision = fp16 or module_dtype(module) in (torch.float16, torch.bfloat16)
    rtol, atol = default_tolerances(low_precision, rtol, atol)
    if rtol < 0 or atol < 0:
        raise UsageError(f"`rtol`/`atol` must be non-negative (got rtol={rtol}, atol={atol})")
    progress = progress or Progress()
    out = check_output_path(path, source)
    with contextlib.ExitStack() as cleanup:  # the temporary file goes, whatever happens
        result, staged = _fold_and_write(
            module,
            example_inputs,
            out,
            cleanup,
            dynamic_batch=dynamic_batch,
            opset=opset,
            fp16=fp16,
            keep_io_types=keep_io_types,
            labels=labels,
            preprocess=preprocess,
            progress=progress,
        )
        if verify:
            # The folded graph and the exporter's program (reference cycles) hold a copy of the
            # weights; free it before ONNX Runtime loads the file, so the two never share the peak.
            collect_garbage()
            try:
                report = verify_onnx(
                    module, staged.path, inputs, rtol=rtol, atol=atol, reference=reference, progress=progress
                )
            except BnfoldError as exc:  # name the target, not the temporary file
                raise type(exc)(str(exc).replace(str(staged.path), str(out)) + _dtype_hint(module)) from exc
            report.onnx_path = str(out)
            result.verify_report = report
            if not report.passed:
                raise VerificationError(
                    f"verification failed, {out} was not written: " + "; ".join(report.failures()), report
                )
        kept = result.fold_report.kept_count
        if result.onnx_batchnorm_count != kept:
            raise VerificationError(
                f"the ONNX graph has {result.onnx_batchnorm_count} BatchNormalization node(s) but the fold "
                f"report keeps {kept}; the export is inconsistent and was not written",
                result.verify_report,
            )
        staged.commit(source)
    return result


def _fold_and_write(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    out: Path,
    cleanup: contextlib.ExitStack,
    *,
    dynamic_batch: bool,
    opset: int | None,
    fp16: bool,
    keep_io_types: bool,
    labels: Sequence[str] | None,
    preprocess: Preprocess | None,
    progress: Progress,
) -> tuple[ExportResult, _Staged]:
    """Fold, export and write the ONNX file to a temporary name beside ``out``: the result so
    far (no verification yet) and the staged file, which the caller commits; its removal is
    registered on ``cleanup`` as soon as it exists. Only the small result leaves this function:
    the folded module and the ONNX IR die with it."""
    progress.start("Folding batch-norms")
    folded = fold(module, example_inputs, dynamic_batch=dynamic_batch)
    progress.finish()
    _check_preprocess(preprocess, example_inputs)
    progress.start("Exporting to ONNX")
    exported, example = folded.program, tuple(example_inputs)
    if fp16:  # float16 weights change the graph's dtypes: convert the module, the exporter traces it
        exported = to_float16(folded.module)
        if keep_io_types:
            exported = with_float32_io(exported)
        else:
            example = tuple(x.half() if x.is_floating_point() else x for x in example)
    model = to_onnx(exported, example, outputs=output_count(exported), dynamic_batch=dynamic_batch, opset=opset)
    report = folded.report
    del folded, exported  # the IR shares the folded weights; nothing else may keep them alive
    try:  # drop the IR's weights on every path (onnxscript keeps the graph alive, see release_weights)
        _check_labels(model, labels)
        _add_metadata(model, report, metadata_props(list(labels) if labels else None, preprocess))
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
            staged = _Staged(out, external=tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD)
            cleanup.callback(staged.cleanup)
        staged.save(model)
    finally:
        release_weights(model)
    progress.finish()
    return result, staged
