"""Dynamic image sizes: which heights and widths a model exported with ``dynamic_size`` takes.

Each spatial axis of an image-like input (``NxCxHxW``) takes the sizes ``min + k·multiple_of``
(``k = 0, 1, ...``), up to ``max`` when there is one: for the usual network, the multiples of its
total stride from some smallest size. The export finds them in the captured program (see
:mod:`bnfold.folding.captured_sizes`), stores them in the ONNX metadata, and everything that runs the model
checks an input against them before ONNX Runtime sees it.

Imports neither torch nor ONNX: the Predictor and the serving code read these rules too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

AXES = ("height", "width")
IMAGE_RANK = 4
"""Image-like inputs are ``NxCxHxW``: their last two axes are the spatial ones."""


@dataclass(frozen=True)
class AxisSizes:
    """The sizes one spatial axis takes: ``min``, ``min + multiple_of``, ... up to ``max``."""

    min: int
    multiple_of: int = 1
    max: int | None = None

    def __post_init__(self) -> None:
        if self.min < 1 or self.multiple_of < 1 or (self.max is not None and self.max < self.min):
            raise ValueError(f"not a size rule: min {self.min}, multiple_of {self.multiple_of}, max {self.max}")

    def allows(self, size: int) -> bool:
        return size >= self.min and (size - self.min) % self.multiple_of == 0 and (self.max is None or size <= self.max)

    def at_most(self, size: int) -> int | None:
        """The largest allowed size not above ``size`` (``None`` below ``min``)."""
        if size < self.min:
            return None
        top = size if self.max is None else min(size, self.max)
        return top - (top - self.min) % self.multiple_of

    def at_least(self, size: int) -> int | None:
        """The smallest allowed size not below ``size`` (``None`` above ``max``)."""
        found = self.min + max(0, -(-(size - self.min) // self.multiple_of)) * self.multiple_of
        return found if self.max is None or found <= self.max else None

    def step_for(self, size: int) -> int:
        """About a quarter of ``size``, in whole steps of ``multiple_of`` (at least one step)."""
        return self.multiple_of * max(1, round(size / 4 / self.multiple_of))

    def __str__(self) -> str:
        if self.multiple_of == 1:
            text = f"at least {self.min}"
        elif self.min % self.multiple_of == 0:
            text = f"a multiple of {self.multiple_of}, at least {self.min}"
        else:
            text = f"{self.min} plus a multiple of {self.multiple_of}"
        return text + (f", at most {self.max}" if self.max is not None else "")

    def to_dict(self) -> dict[str, int | None]:
        return {"min": self.min, "multiple_of": self.multiple_of, "max": self.max}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AxisSizes:
        return cls(
            int(data["min"]), int(data.get("multiple_of", 1)), None if data.get("max") is None else int(data["max"])
        )


@dataclass(frozen=True)
class ImageSizes:
    """The heights and widths an image-like input takes, and the size the model was traced at."""

    height: AxisSizes
    width: AxisSizes
    example: tuple[int, int]

    def allows(self, height: int, width: int) -> bool:
        return self.height.allows(height) and self.width.allows(width)

    def problem(self, height: int, width: int) -> str | None:
        """Why ``height x width`` is not allowed, in a phrase naming the allowed sizes and the
        nearest ones (``None`` when it is allowed)."""
        wrong = [
            f"{axis} {size}: expected {rule}{_nearest(rule, size)}"
            for axis, rule, size in zip(AXES, (self.height, self.width), (height, width))
            if not rule.allows(size)
        ]
        return "; ".join(wrong) or None

    def verification_sizes(self) -> list[tuple[int, int]]:
        """The example size, then (where the rules allow) a smaller and a larger one, neither
        square; a second larger one where no smaller one is both allowed and not square."""
        (h, w), rows, cols = self.example, self.height, self.width
        dh, dw = rows.step_for(h), cols.step_for(w)
        low_h, low_w = rows.at_most(h - dh) or h, cols.at_most(w - dw) or w
        smaller = [(low_h, low_w), (low_h, w), (h, low_w)]
        larger = [(rows.at_least(h + a * dh), cols.at_least(w + b * dw)) for a, b in ((1, 2), (2, 1), (1, 1), (2, 3))]
        sizes = [self.example]
        for candidates in (smaller, larger, larger):
            found = next((c for c in candidates if self._other(c) and c not in sizes), None)
            if found is not None and len(sizes) < 3:
                sizes.append(found)
        return sizes

    def _other(self, size: tuple[int | None, int | None]) -> bool:
        """Whether ``size`` is allowed, not square and not the example's."""
        height, width = size
        return height is not None and width is not None and height != width and self.allows(height, width)

    def __str__(self) -> str:
        return f"height {self.height}; width {self.width}"

    def to_dict(self) -> dict[str, Any]:
        return {"height": self.height.to_dict(), "width": self.width.to_dict(), "example": list(self.example)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageSizes:
        example = tuple(int(v) for v in data["example"])
        if len(example) != 2:
            raise ValueError(f"example size {example}: expected [height, width]")
        return cls(AxisSizes.from_dict(data["height"]), AxisSizes.from_dict(data["width"]), (example[0], example[1]))


def _nearest(rule: AxisSizes, size: int) -> str:
    near = sorted({v for v in (rule.at_most(size), rule.at_least(size)) if v is not None})
    return f" (nearest: {' or '.join(map(str, near))})" if near else ""
