"""Running PyTorch modules the way folding and verification need: eval mode, no grad, quiet."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .errors import BnfoldError, Label, first_line, label_parts


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the duration, restoring each submodule's mode after.

    The flags are set directly, as ``nn.Module.eval`` does: modules from ``torch.export`` refuse
    ``.eval()`` (their graph is already fixed in eval mode).
    """
    modes = [(m, m.training) for m in module.modules()]
    for m, _ in modes:
        m.training = False
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Silence torch's exporters: their prints, warnings and log lines."""
    loggers = [logging.getLogger(n) for n in ("torch", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def module_types(module: nn.Module) -> dict[str, str]:
    """Class name of every submodule by path (TorchScript modules report their original class)."""
    return {path: getattr(m, "original_name", None) or type(m).__name__ for path, m in module.named_modules()}


@contextlib.contextmanager
def attributes_restored(module: nn.Module) -> Iterator[nn.Module]:
    """Put back, after the block, every attribute, parameter and buffer entry of each submodule
    of ``module``, and the contents of its list, dict and set attributes: a forward that caches
    state on its module (an anchor grid, the last input shape, a per-shape cache, a call log)
    leaves it as it was. Tensors changed in place are not restored (an eval-mode forward
    has no reason to); TorchScript modules are left alone (their attributes are typed slots)."""
    if isinstance(module, torch.jit.ScriptModule):
        yield module
        return
    saved = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in module.modules()]
    # Lists, dicts and sets a forward may fill in place (a call log, a per-shape cache).
    contents = [
        (value, copy.copy(value))
        for _, attributes, *_ in saved
        for value in attributes.values()
        if type(value) in (list, dict, set)
    ]
    try:
        yield module
    finally:
        for m, attributes, parameters, buffers, children in saved:
            m.__dict__.clear()
            m.__dict__.update(attributes)
            for live, old in ((m._parameters, parameters), (m._buffers, buffers), (m._modules, children)):
                live.clear()
                live.update(old)
        for live, old in contents:
            live.clear()
            live.update(old) if isinstance(live, (dict, set)) else live.extend(old)


def run_eval(module: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Outputs of ``module(*inputs)`` in eval mode under ``no_grad``, flattened in pytree order;
    the module keeps its attributes (see :func:`attributes_restored`)."""
    with attributes_restored(module), eval_mode(module), torch.no_grad():
        out = module(*inputs)
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first floating parameter or buffer (float32 if it has none)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (the CPU if it has none)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def model_failures(
    inputs: Sequence[torch.Tensor], error: type[BnfoldError], what: Label, hint: Label
) -> Iterator[None]:
    """Turn an exception from the user's model into ``error`` naming ``what`` it was run on, the
    input shapes, the model's own message and a ``hint``; bnfold's own errors pass through."""
    try:
        yield
    except BnfoldError:
        raise
    except Exception as exc:
        shapes = ", ".join("x".join(map(str, t.shape)) for t in inputs)
        raise error(
            *label_parts(what), f" shape(s) {shapes}: {first_line(exc, with_type=True)}. ", *label_parts(hint)
        ) from exc
