"""What a model's inputs and outputs are: name, shape with its free dimensions, numpy dtype."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UsageError

_ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (``None`` or a string for a free dimension) and numpy dtype of a model input/output."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype

    @property
    def fixed_dims(self) -> tuple[tuple[int, int], ...]:
        """(axis, size) of every fixed dimension after the batch axis."""
        return tuple((i, d) for i, d in enumerate(self.shape) if i > 0 and isinstance(d, int))

    @property
    def batch_is_dynamic(self) -> bool:
        return bool(self.shape) and not isinstance(self.shape[0], int)

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether a batch of ``shape`` (batch axis first) has this input's rank and fixed sizes."""
        return len(shape) == len(self.shape) and all(shape[i] == d for i, d in self.fixed_dims)

    def shape_error(self, shape: tuple[int, ...]) -> UsageError:
        """The error for a batch of ``shape`` that does not fit this input."""
        want = "x".join("N" if i == 0 else (str(d) if isinstance(d, int) else "?") for i, d in enumerate(self.shape))
        return UsageError(f"input '{self.name}': expected shape {want}, got {'x'.join(map(str, shape))}")

    def shape_for(self, batch: int) -> tuple[int, ...] | None:
        """The shape for a batch of ``batch`` when only the batch axis is free, else None."""
        if not self.shape or any(not isinstance(d, int) for d in self.shape[1:]):
            return None
        return (batch if self.batch_is_dynamic else self.shape[0], *self.shape[1:])


def tensor_spec(arg: Any) -> TensorSpec:
    """The :class:`TensorSpec` of an ONNX Runtime ``NodeArg`` (``session.get_inputs()`` items)."""
    if arg.type not in _ORT_FLOAT_TYPES:
        dtype = np.dtype(np.int64) if "int64" in arg.type else np.dtype(object)
    else:
        dtype = np.dtype(_ORT_FLOAT_TYPES[arg.type])
    return TensorSpec(arg.name, tuple(d if isinstance(d, int) else (d or None) for d in arg.shape), dtype)
