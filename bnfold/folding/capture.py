"""Capture an eval-mode model as a flat ATen graph (torch.export) that the fold pass can rewrite."""

from __future__ import annotations

import contextlib
import copy
import inspect
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from ..errors import FoldError, Param, UsageError, first_line
from ..image_sizes import ImageSizes
from ..user_module import attributes_restored, eval_mode, model_failures, quiet_torch, run_eval
from .batch_guard import batch_fixing_line
from .captured_sizes import image_sizes, is_image
from .guard_log import GuardLog

# torch.export specialises a dimension whose example size is 0 or 1, so a dynamic batch is
# captured with this example batch size (inputs are repeated along dim 0 to reach it).
CAPTURE_BATCH = 2


def batch_dynamic_shapes(module: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[Any, ...]:
    """A ``dynamic_shapes`` spec marking dim 0 of every input as one shared batch dimension,
    shaped like ``module.forward``'s signature (a ``*args`` parameter takes a tuple of specs)."""
    return dynamic_shapes(module, inputs, batch=True, size=False)


def dynamic_shapes(module: nn.Module, inputs: Sequence[torch.Tensor], *, batch: bool, size: bool) -> tuple[Any, ...]:
    """A ``dynamic_shapes`` spec for ``module.forward``'s signature (a ``*args`` parameter takes a
    tuple of specs): with ``batch``, dim 0 of every input is one shared batch dimension; with
    ``size``, the height and width of every image-like input are free (``Dim.AUTO``: torch finds
    their constraints, see :mod:`bnfold.folding.captured_sizes`)."""
    shared = torch.export.Dim("batch", min=1)

    def axes(x: torch.Tensor) -> dict[int, Any]:
        spec: dict[int, Any] = {0: shared} if batch else {}
        if size and is_image(x):
            spec.update({2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO})
        return spec

    spec: list[Any] = []
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    remaining = list(inputs)
    for param in params:
        if remaining and param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            spec.append(axes(remaining.pop(0)))
        elif remaining and param.kind == param.VAR_POSITIONAL:
            spec.append(tuple(axes(x) for x in remaining))
            remaining = []
    spec.extend(axes(x) for x in remaining)
    return tuple(spec)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside ``DataParallel``/``DistributedDataParallel`` wrappers."""
    while isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        module = module.module
    return module


def with_batch(inputs: Sequence[torch.Tensor], batch: int) -> tuple[torch.Tensor, ...]:
    """The inputs resized along dim 0 to ``batch`` rows (repeating or truncating rows)."""
    out = []
    for x in inputs:
        reps = -(-batch // x.shape[0])
        out.append(x.repeat(reps, *([1] * (x.dim() - 1)))[:batch])
    return tuple(out)


def _fixes_the_batch(exc: BaseException) -> bool:
    message = str(exc)
    return "Constraints violated" in message or bool(re.search(r"Guard failed: \w+\.size\(\)\[0\]", message))


def _failing_construct(exc: BaseException) -> str:
    """`` at file:line: code`` of the innermost user-code frame torch's message names, if any."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s+(.+)', str(exc))
    user = [f for f in frames if "site-packages" not in f[0] and "/torch/" not in f[0]]
    if not user:
        return ""
    path, line, code = user[-1]
    return f" at {path}:{line}: {code.strip()}"


def _check_forward(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Run a copy of the model eagerly, so that when capture fails, a rejected input shape or a
    failing forward is named as such. A copy: a forward may cache state on its module (a model
    that cannot be copied is not run)."""
    try:
        module = copy.deepcopy(module)
    except Exception:  # deepcopy raises whatever the model's tensors or attributes raise
        return
    with (
        model_failures(
            inputs,
            FoldError,
            "the model fails on input",
            ("Check ", Param("input_shapes"), ", or fix the model's forward"),
        ),
        quiet_torch(),
    ):
        run_eval(module, inputs)


def _as_plain_module(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> nn.Module:
    """A module torch.export can trace: TorchScript is converted to an exported program first."""
    if not isinstance(module, torch.jit.ScriptModule):
        return module
    from torch._export.converter import TS2EPConverter

    try:
        return TS2EPConverter(module, inputs).convert().module()
    except Exception as exc:  # the converter raises many types
        raise FoldError(
            f"cannot convert the TorchScript model to a traceable graph: {first_line(exc)}. "
            "Save the model as a state_dict (with ",
            Param("arch"),
            ") or with torch.export.save instead.",
        ) from exc


def capture(
    module: nn.Module, example_inputs: Sequence[torch.Tensor], *, dynamic_batch: bool = True
) -> ExportedProgram:
    """Trace ``module`` in eval mode, once, into a ``torch.export`` program.

    With ``dynamic_batch`` the batch axis (dim 0 of every input) stays symbolic; a model that
    cannot take a dynamic batch is a :class:`FoldError` that says to use a static batch. The
    module is never run itself (its forward may cache state, e.g. an anchor grid): a failed
    capture is explained by running a copy, and whatever the trace assigns to the module's
    attributes is put back (see :func:`attributes_restored`).
    """
    module = unwrap(module)
    with attributes_restored(module):
        return _trace(module, tuple(example_inputs), dynamic_batch, None)


def capture_sized(
    module: nn.Module, example_inputs: Sequence[torch.Tensor], *, dynamic_batch: bool = True
) -> tuple[ExportedProgram, tuple[ImageSizes | None, ...]]:
    """:func:`capture` with the height and width of every image-like input (``NxCxHxW``) free:
    the program, and the sizes each input takes (``None`` for one that is not image-like; see
    :mod:`bnfold.folding.captured_sizes`). A model whose code fixes a size is a :class:`FoldError` naming
    the op and the line; a model without an image-like input is a :class:`UsageError`."""
    module = unwrap(module)
    inputs = tuple(example_inputs)
    if not any(is_image(x) for x in inputs):
        shapes = ", ".join("x".join(map(str, x.shape)) for x in inputs)
        raise UsageError(
            Param("dynamic_size"),
            f" frees the height and width of image-like inputs (NxCxHxW, floating point); the model takes {shapes}",
        )
    log = GuardLog(module)
    with attributes_restored(module):
        program = _trace(module, inputs, dynamic_batch, log)
    traced = with_batch(inputs, CAPTURE_BATCH) if dynamic_batch else inputs
    return program, image_sizes(program, traced, log)


def _trace(
    module: nn.Module, example_inputs: tuple[torch.Tensor, ...], dynamic_batch: bool, log: GuardLog | None
) -> ExportedProgram:
    """The capture; with ``log``, the spatial axes of image-like inputs are free and the guards
    torch adds are recorded in it."""
    inputs = example_inputs
    if dynamic_batch:
        inputs = with_batch(inputs, CAPTURE_BATCH)
    recording = log if log is not None else contextlib.nullcontext()
    try:
        with eval_mode(module), torch.no_grad(), quiet_torch():
            traceable = _as_plain_module(module, inputs)
            shapes = (
                dynamic_shapes(traceable, inputs, batch=dynamic_batch, size=log is not None)
                if dynamic_batch or log is not None
                else None
            )
            with recording:
                return torch.export.export(traceable, inputs, dynamic_shapes=shapes, strict=False)
    except FoldError:  # TorchScript conversion failed: name a failing forward first
        _check_forward(module, tuple(example_inputs))
        raise
    except Exception as exc:
        error = exc
    _check_forward(module, tuple(example_inputs))
    if dynamic_batch and _fixes_the_batch(error):
        with eval_mode(module), torch.no_grad(), quiet_torch():
            line = batch_fixing_line(
                lambda: torch.export.export(traceable, inputs, dynamic_shapes=shapes, strict=False)
            )
        where = f" at {line}" if line else f" ({first_line(error, lines=2)})"
        raise FoldError(
            "the model cannot take a dynamic batch size: its code, or the program it was saved as, "
            f"fixes the batch dimension{where}. Change that code, or re-run with ",
            Param("dynamic_batch", False),
            " to export for the given batch size.",
        ) from error
    with eval_mode(module), torch.no_grad(), quiet_torch():
        try:  # the other capture path: TorchDynamo bytecode tracing
            if log is not None:
                log.sites.clear()
            with recording:
                return torch.export.export(traceable, inputs, dynamic_shapes=shapes, strict=True)
        except Exception:
            pass
    raise FoldError(
        f"torch.export cannot trace the model (non-strict and strict): {type(error).__name__}: "
        f"{first_line(error)}{_failing_construct(error)}. Rewrite that construct "
        "(e.g. data-dependent control flow) or save the model with torch.export yourself"
    ) from error
