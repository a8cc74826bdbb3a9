"""Recompute batch-norm running statistics as exact population statistics over given data.

Running mean/variance are exponential moving averages of training batches; at test time a
batch-norm is meant to use the mean and variance of the training data. This pass runs the data
through the model with the batch-norms in train-statistics mode (everything else in eval mode,
so dropout stays off), accumulates each batch-norm input's per-channel mean and unbiased
variance exactly in float64 over all the data, and stores them. No other parameter or buffer
changes. As in training, each batch-norm normalises a batch with that batch's statistics, so the
inputs of batch-norms that follow other batch-norms depend (slightly) on the batch size: use
batches as large as in training. A batch-norm whose input no other batch-norm precedes gets the
exact population statistics whatever the batch size.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .arrays import ArraysArg, read_arrays, select_inputs
from .batching import plan_batches
from .defaults import RECALIBRATION_BATCH_SIZE
from .errors import Param, UsageError
from .progress import Progress
from .report import RecalibratedLayer, RecalibrationReport
from .user_module import eval_mode, model_failures, module_device, module_dtype

# How errors name this step and its data (the CLI writes its --recalibrate flag).
RECALIBRATE = Param("recalibrate")


@dataclass
class _Moments:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch (Chan et al.)."""

    count: int = 0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        values = x.detach().to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
        n = values.shape[1]
        batch_mean = values.mean(dim=1)
        batch_m2 = ((values - batch_mean[:, None]) ** 2).sum(dim=1)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, batch_mean, batch_m2
            return
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * n / total)
        self.count = total


@dataclass
class _Tracked:
    name: str
    layer: nn.modules.batchnorm._BatchNorm
    moments: _Moments = field(default_factory=_Moments)


def _input_names(module: nn.Module, count: int) -> list[str]:
    try:
        params = [
            p.name
            for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    return params[:count] if len(params) >= count else [f"input_{i}" for i in range(count)]


def recalibrate(
    module: nn.Module,
    data: ArraysArg,
    *,
    inputs: int = 1,
    batch_size: int = RECALIBRATION_BATCH_SIZE,
    progress: Progress | None = None,
) -> RecalibrationReport:
    """Replace every batch-norm's running mean/variance of ``module`` (in place) with the
    population mean and unbiased variance of its input over ``data`` (see the module docstring).

    ``data``: a ``.npy``/``.npz`` path, an array, or a mapping of input name -> array for models
    with ``inputs`` > 1. Needs a Python module with ``nn.BatchNorm`` layers (not TorchScript or a
    loaded ``torch.export`` program). Returns the per-layer shift of mean and variance.
    """
    if isinstance(module, (torch.jit.ScriptModule, torch.fx.GraphModule)):
        raise UsageError(
            RECALIBRATE,
            " needs the model's Python classes (nn.BatchNorm layers); load it as a state_dict with ",
            Param("arch"),
            " (or a trusted pickle, ",
            Param("trust_pickle", True),
            ") instead of TorchScript or torch.export",
        )
    tracked = [
        _Tracked(name, m)
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not tracked:
        raise UsageError(RECALIBRATE, ": the model has no batch-norm layer with running statistics")
    if batch_size < 2:
        raise UsageError(Param("batch_size"), f" must be at least 2 (got {batch_size}): one sample has no variance")
    arrays = select_inputs(read_arrays(data, RECALIBRATE), _input_names(module, inputs), RECALIBRATE)
    if arrays[0].shape[0] < 2:
        raise UsageError(RECALIBRATE, ": needs at least 2 samples")
    progress = progress or Progress()
    saved = {t.name: {k: v.clone() for k, v in t.layer.state_dict().items()} for t in tracked}
    hooks = [t.layer.register_forward_pre_hook(lambda _m, args, t=t: t.moments.add(args[0])) for t in tracked]
    dtype, device = module_dtype(module), module_device(module)
    # A last batch of one sample has no variance: it joins the one before it.
    batches = plan_batches(arrays[0].shape[0], batch_size, min_last=2)
    progress.start("Recalibrating batch-norm statistics")
    try:
        with eval_mode(module), torch.no_grad():
            for t in tracked:
                t.layer.training = True  # normalise with batch statistics, as in training
            for i, batch in enumerate(batches):
                inputs = [
                    torch.from_numpy(np.ascontiguousarray(a[batch.rows])).to(device=device, dtype=dtype) for a in arrays
                ]
                with model_failures(
                    inputs, UsageError, (RECALIBRATE, ": the model fails on the data's"), "Give data the model takes."
                ):
                    module(*inputs)
                progress.advance(i + 1, len(batches))
    finally:
        for hook in hooks:
            hook.remove()
        for t in tracked:  # undo the momentum updates train mode made during the pass
            t.layer.load_state_dict(saved[t.name])
    progress.finish()
    layers = []
    for t in tracked:
        m = t.moments
        if m.mean is None or m.count < 2:
            continue  # the layer was not called on this data
        old_mean = t.layer.running_mean.detach().to(torch.float64)
        old_var = t.layer.running_var.detach().to(torch.float64)
        new_var = m.m2 / (m.count - 1)
        t.layer.running_mean.copy_(m.mean.to(t.layer.running_mean.dtype))
        t.layer.running_var.copy_(new_var.to(t.layer.running_var.dtype))
        ratio = new_var / old_var.clamp_min(torch.finfo(torch.float64).tiny)
        layers.append(
            RecalibratedLayer(
                name=t.name,
                channels=int(m.mean.numel()),
                values_per_channel=m.count,
                max_mean_shift=float((m.mean - old_mean).abs().max()),
                var_ratio_min=float(ratio.min()),
                var_ratio_max=float(ratio.max()),
            )
        )
    return RecalibrationReport(layers=layers, samples=int(arrays[0].shape[0]), batches=len(batches))
