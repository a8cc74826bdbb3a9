"""What an exported model carries besides its graph, and every ONNX ``metadata_props`` key
bnfold writes: the bnfold version, the fold report (counts, kept reasons, the float64 proof),
input and output names, the weights' dtype, class labels, image preprocessing and, for an INT8
model, its quantization and accuracy check.

Labels and preprocessing are stored as JSON and read back by the Predictor; model files may carry
them too (TorchScript/torch.export ``bnfold.json`` extra file, checkpoint-dict keys ``labels`` /
``preprocess``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import Param, UsageError
from .image_sizes import ImageSizes

VERSION_KEY = "bnfold_version"
FOLD_REPORT_KEY = "bnfold_fold_report"
INPUT_NAMES_KEY = "bnfold_input_names"
OUTPUT_NAMES_KEY = "bnfold_output_names"
WEIGHT_DTYPE_KEY = "bnfold_weight_dtype"
"""The dtype of the model's weights (``float32``, ``float16``): picks ``bnfold verify``'s tolerances."""
INT8_KEY = "bnfold_int8"
"""An INT8 model's calibration, float layers and measured accuracy (JSON), see :func:`int8_props`."""
INT8_WEIGHT_DTYPE = "int8"
"""``WEIGHT_DTYPE_KEY``'s value for an INT8 model."""
LABELS_KEY = "bnfold_labels"
PREPROCESS_KEY = "bnfold_preprocess"
IMAGE_SIZES_KEY = "bnfold_image_sizes"
"""A dynamic-size model's image sizes: input name -> ``{"height": {"min", "multiple_of", "max"},
"width": {...}, "example": [h, w]}`` (see :mod:`bnfold.image_sizes`); absent when the size is fixed."""
CHANNEL_ORDERS = ("RGB", "BGR", "L")
DYNAMIC = "dynamic"
"""``--preprocess-size dynamic``: each image keeps its own size (a dynamic-size model)."""


@dataclass(frozen=True)
class Preprocess:
    """Image preprocessing: resize to ``size`` (H, W; ``None``: each image keeps its own size,
    for a model exported with a dynamic size), scale pixels by ``scale``, order the channels
    (``RGB``, ``BGR`` or grayscale ``L``), then ``(x - mean) / std`` per channel."""

    size: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channel_order: str = "RGB"
    scale: float = 1 / 255

    def __post_init__(self) -> None:
        channels = 1 if self.channel_order == "L" else 3
        if self.channel_order not in CHANNEL_ORDERS:
            raise UsageError(
                Param("preprocess.channel_order"),
                f" {self.channel_order!r}: expected one of {', '.join(CHANNEL_ORDERS)}",
            )
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise UsageError(Param("preprocess.size"), f" {self.size}: expected HxW, e.g. 224x224")
        for name, values in (("preprocess.mean", self.mean), ("preprocess.std", self.std)):
            if len(values) not in (1, channels):
                raise UsageError(Param(name), f": {len(values)} values for {channels} channel(s)")
        if any(v == 0 for v in self.std):
            raise UsageError(Param("preprocess.std"), ": values must be non-zero")

    @property
    def channels(self) -> int:
        return 1 if self.channel_order == "L" else 3

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        try:
            return cls(
                size=None if data["size"] is None else tuple(int(v) for v in data["size"]),
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
                channel_order=str(data.get("channel_order", "RGB")),
                scale=float(data.get("scale", 1 / 255)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"preprocessing metadata {data!r} is incomplete: needs size, mean and std") from exc


def preprocess_for(
    input_shape: Sequence[int],
    carried: Preprocess | None = None,
    *,
    size: Sequence[int] | str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    channel_order: str | None = None,
    dynamic_size: bool = False,
) -> Preprocess | None:
    """The preprocessing to store for a model whose first input has ``input_shape``: ``carried``
    (what the model file says) with each given field replacing its value (``size`` may be
    :data:`DYNAMIC`: each image at its own size). Fields neither gives default to the input's: its
    ``HxW`` (dynamic for a model exported with ``dynamic_size``), ``"L"`` for one channel else
    ``"RGB"``, mean 0, std 1. ``None`` when there is nothing to store (no ``carried`` and no field
    given)."""
    given = {"size": size, "mean": mean, "std": std, "channel_order": channel_order}
    given = {name: value for name, value in given.items() if value is not None}
    if not given and carried is None:
        return None
    if given.get("size") == DYNAMIC:
        given["size"] = None
    shape = tuple(input_shape)
    image = len(shape) == 4
    defaults = {
        "size": None if dynamic_size else shape[2:4] if image else (),
        "mean": (0.0,),
        "std": (1.0,),
        "channel_order": "L" if image and shape[1] == 1 else "RGB",
    }
    return Preprocess.from_dict({**defaults, **(asdict(carried) if carried else {}), **given})


def read_labels(path: str | os.PathLike[str]) -> list[str]:
    """Class labels from a text file, one per line (blank lines at the end are ignored), for the
    ``labels`` parameter of :func:`bnfold.export` (errors name it)."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(Param("labels"), f" {file}: file does not exist")
    try:
        labels = file.read_text(encoding="utf-8").rstrip("\n").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(Param("labels"), f" {file}: cannot read it as UTF-8 text ({exc})") from exc
    if not labels or any(not label.strip() for label in labels):
        raise UsageError(Param("labels"), f" {file}: expected one non-empty label per line")
    return [label.strip() for label in labels]


def parse_floats(text: str, parameter: str) -> tuple[float, ...]:
    """``"0.485,0.456,0.406"`` -> a tuple of floats; a :class:`UsageError` naming the Python
    ``parameter`` the text is for (e.g. ``preprocess.mean``) if malformed."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise UsageError(Param(parameter), f" {text!r}: expected comma-separated numbers") from exc


def metadata_props(labels: list[str] | None, preprocess: Preprocess | None) -> dict[str, str]:
    """The ONNX metadata entries for labels and preprocessing."""
    props = {}
    if labels:
        props[LABELS_KEY] = json.dumps(labels)
    if preprocess is not None:
        props[PREPROCESS_KEY] = preprocess.to_json()
    return props


def image_size_props(sizes: Mapping[str, ImageSizes]) -> dict[str, str]:
    """The ONNX metadata entry of a dynamic-size model's image sizes, by input name (none for a
    model of fixed size)."""
    if not sizes:
        return {}
    return {IMAGE_SIZES_KEY: json.dumps({name: rule.to_dict() for name, rule in sizes.items()})}


def image_sizes_from_metadata(props: Mapping[str, str]) -> dict[str, ImageSizes]:
    """The image sizes each input of a dynamic-size model takes, by input name (empty for a model
    of fixed size)."""
    if IMAGE_SIZES_KEY not in props:
        return {}
    return {name: ImageSizes.from_dict(rule) for name, rule in json.loads(props[IMAGE_SIZES_KEY]).items()}


def from_metadata(props: dict[str, str]) -> tuple[list[str] | None, Preprocess | None]:
    """Labels and preprocessing read back from ONNX metadata (``None`` where absent)."""
    labels = json.loads(props[LABELS_KEY]) if LABELS_KEY in props else None
    preprocess = Preprocess.from_dict(json.loads(props[PREPROCESS_KEY])) if PREPROCESS_KEY in props else None
    return labels, preprocess


def int8_props(summary: dict[str, Any]) -> dict[str, str]:
    """The ONNX metadata entries of an INT8 model: ``summary`` (what
    :meth:`bnfold.report.Int8Report.summary` returns) and the weights' dtype."""
    return {INT8_KEY: json.dumps(summary, separators=(",", ":")), WEIGHT_DTYPE_KEY: INT8_WEIGHT_DTYPE}


def int8_from_metadata(props: dict[str, str]) -> dict[str, Any] | None:
    """An INT8 model's quantization facts read back from ONNX metadata; ``None`` for other models."""
    return json.loads(props[INT8_KEY]) if INT8_KEY in props else None
