"""What loading produces: the eval-mode module with what its file records of its inputs, labels
and preprocessing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError, Param, UsageError
from ..metadata import Preprocess
from ..shapes import Shape

# The formats a model file can have (LoadedModel.format).
TORCHSCRIPT = "torchscript"
EXPORTED_PROGRAM = "torch.export"
STATE_DICT = "state_dict"
PICKLED_MODULE = "pickled nn.Module"

# Checkpoint-dict keys (and bnfold.json keys) that record the input shapes.
INPUT_SHAPE_KEYS = ("input_shape", "input_shapes")


@dataclass
class LoadedModel:
    """A model ready for folding: the module in eval mode and what the file says of its inputs."""

    module: nn.Module
    path: Path
    format: str
    input_shapes: list[Shape] | None = None
    """One shape per model input, batch first, if the file records them."""
    input_dtypes: list[torch.dtype] | None = None
    labels: list[str] | None = None
    """Class labels the file carries (``labels`` key / ``bnfold.json``), if any."""
    preprocess: Preprocess | None = None
    """Image preprocessing the file carries (``preprocess`` key / ``bnfold.json``), if any."""

    def example_inputs(self, input_shapes: Sequence[Shape] | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Seeded random-normal inputs of ``input_shapes`` (or the shapes the file records)."""
        shapes = list(input_shapes) if input_shapes else self.input_shapes
        if not shapes:
            raise UsageError(
                f"{self.path}: the file does not record the model's input shape; pass ",
                Param("input_shapes"),
                ", one shape per input, batch first, e.g. 1x3x224x224",
            )
        dtypes = self.input_dtypes if self.input_dtypes and len(self.input_dtypes) == len(shapes) else None
        gen = torch.Generator().manual_seed(seed)
        return tuple(
            torch.randn(shape, generator=gen, dtype=torch.float32).to(dtypes[i] if dtypes else torch.float32)
            for i, shape in enumerate(shapes)
        )


def _shapes_from(value: Any, source: str) -> list[Shape]:
    try:
        items = value if value and isinstance(value[0], (list, tuple)) else [value]
        return [tuple(int(d) for d in s) for s in items]
    except (TypeError, ValueError, IndexError) as exc:
        raise ModelLoadError(f"{source}: the recorded input shape {value!r} is not a list of sizes") from exc


def with_file_metadata(loaded: LoadedModel, meta: Mapping[str, Any]) -> LoadedModel:
    """``loaded`` with the input shapes, labels and preprocessing recorded in ``meta`` (a
    checkpoint dict or ``bnfold.json``); a :class:`ModelLoadError` if they are malformed."""
    for key in INPUT_SHAPE_KEYS:
        if key in meta:
            loaded.input_shapes = _shapes_from(meta[key], str(loaded.path))
    labels = meta.get("labels")
    if labels is not None:
        if not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) for x in labels):
            raise ModelLoadError(f"{loaded.path}: its recorded labels are not a list of strings")
        loaded.labels = list(labels)
    if isinstance(meta.get("preprocess"), Mapping):
        try:
            loaded.preprocess = Preprocess.from_dict(dict(meta["preprocess"]))
        except UsageError as exc:
            raise ModelLoadError(f"{loaded.path}: its recorded preprocessing is invalid ({exc})") from exc
    return loaded


def check_finite(loaded: LoadedModel) -> LoadedModel:
    """``loaded``, or a :class:`ModelLoadError` naming the first parameter that holds NaN or inf."""
    for name, param in loaded.module.named_parameters():
        if param.dtype.is_floating_point:
            bad = int((~torch.isfinite(param.detach())).sum())
            if bad:
                raise ModelLoadError(
                    f"{loaded.path}: parameter '{name}' holds {bad} NaN/inf value(s) of {param.numel()}: "
                    "the checkpoint is corrupt or training diverged; restore an earlier checkpoint or re-train"
                )
    return loaded
