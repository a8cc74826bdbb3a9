"""HTTP request bodies as model inputs, and model outputs as JSON answers.

A body is JSON (``{"inputs": X}``, ``X`` a nested list with the batch axis, or an object of input
name -> nested list), a ``.npy``/``.npz`` file, or one image file (for a model exported with
preprocessing). Decoding reuses what ``bnfold predict`` reads files with; nothing here needs Ray.

What a body decodes to is capped: arrays and images declare their size in their headers, which are
read first, so a compressed body that would expand past the cap (an ``.npz`` of zeros, a huge
blank PNG) is refused before anything is decompressed. A JSON body needs no check: it holds fewer
numbers than bytes, and the caller caps its bytes.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from ..arrays import INPUT_KEYS, declared_elements, load_arrays, select_inputs
from ..errors import UsageError, first_line
from ..images import image_elements, load_image
from ..predictor import Predictor, TensorSpec, class_label, top_k

JSON = "json"
ARRAYS = "arrays"
IMAGE = "image"
# Media types (without parameters such as "; charset=utf-8") -> the kind of body.
ARRAY_TYPES = ("application/x-npy", "application/x-npz", "application/octet-stream")
BODY = "request body"
# orjson writes numpy arrays itself (C-contiguous ones of its dtypes; the rest go to _as_list), in
# their own precision (a float32 as its shortest float32 form), some 15x faster than json.dumps of
# tolist() for a 1,000-class answer; NaN and infinities become null, as JSON has neither.
JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


class TooLargeError(UsageError):
    """A body that would decode to more elements than the server decodes per request."""


def body_kind(content_type: str | None) -> str | None:
    """``JSON``, ``ARRAYS`` or ``IMAGE`` for a ``Content-Type`` header (JSON when there is none),
    or ``None`` for a media type this server does not read."""
    media = (content_type or "application/json").split(";")[0].strip().lower()
    if media == "application/json":
        return JSON
    if media in ARRAY_TYPES:
        return ARRAYS
    if media.startswith("image/"):
        return IMAGE
    return None


def decode_body(body: bytes, kind: str, predictor: Predictor, max_elements: int) -> dict[str, np.ndarray]:
    """The checked model feeds (input name -> array with the batch axis) a body of ``kind``
    holds; a one-line :class:`UsageError` naming the problem if it holds none, a
    :class:`TooLargeError` if its arrays or image would decode to more than ``max_elements``
    elements (known from their headers, before decoding)."""
    specs = predictor.inputs
    if kind == IMAGE:
        if len(specs) != 1:
            raise UsageError(f"{BODY}: an image is one input, but this model has {len(specs)}: send JSON or .npz")
        _check_size(image_elements(io.BytesIO(body)), max_elements, "its image decodes to")
        arrays = [load_image(io.BytesIO(body), predictor.image_preprocessing(), name=BODY)[None]]
    elif kind == ARRAYS:
        _check_size(declared_elements(body, BODY), max_elements, "its arrays hold")
        arrays = select_inputs(_known(load_arrays(io.BytesIO(body), BODY), specs), [s.name for s in specs], BODY)
    else:
        arrays = select_inputs(_known(_json_arrays(body, specs), specs), [s.name for s in specs], BODY)
    feeds = {spec.name: predictor.check_input(spec, array) for spec, array in zip(specs, arrays)}
    for name, array in feeds.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise UsageError(f"{BODY}: input '{name}' holds NaN or infinite values, which the model gives no meaning")
    return feeds


def _check_size(elements: int, limit: int, what: str) -> None:
    if elements > limit:
        raise TooLargeError(
            f"{BODY}: {what} {elements:,} values, more than the {limit:,} this server decodes per request"
        )


def _known(arrays: dict[str, np.ndarray], specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """``arrays`` when every name is one the model takes (an input's name; for a single-input
    model also a usual one such as ``x``, or none, as a bare ``.npy`` or JSON list has); a name
    it does not take is a UsageError, never silently dropped."""
    names = [s.name for s in specs]
    allowed = {*names, *(INPUT_KEYS if len(names) == 1 else ()), ""}
    unknown = sorted(set(arrays) - allowed)
    if unknown:
        raise UsageError(
            f"{BODY}: unknown input name(s) {', '.join(unknown)}; the model's inputs are {', '.join(names)}"
        )
    return arrays


def _json_arrays(body: bytes, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """The arrays of a ``{"inputs": ...}`` JSON body, as the dtype of the input each is for."""
    try:
        data = orjson.loads(body)  # 3x faster than json.loads for a 224x224 image
    except orjson.JSONDecodeError:
        try:  # what json.loads also reads: NaN and Infinity (Python's json.dumps writes them), a BOM, UTF-16
            data = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise UsageError(f"{BODY}: not valid JSON ({first_line(exc)})") from exc
    if not isinstance(data, dict) or "inputs" not in data:
        raise UsageError(f'{BODY}: expected a JSON object {{"inputs": ...}}')
    inputs = data["inputs"]
    named = inputs if isinstance(inputs, dict) else {specs[0].name if len(specs) == 1 else "": inputs}
    dtypes = {s.name: s.dtype for s in specs}
    arrays = {}
    for name, value in named.items():
        try:
            arrays[name] = np.asarray(value, dtype=dtypes.get(name, np.float32))
        except (ValueError, TypeError) as exc:
            raise UsageError(
                f"{BODY}: input '{name}' is not a rectangular nested list of numbers ({first_line(exc)})"
            ) from exc
    return arrays


def answer(outputs: Sequence[np.ndarray], predictor: Predictor, k: int) -> dict[str, Any]:
    """The answer for one request's outputs (model order, batch axis first), arrays as they are
    for :func:`json_bytes` to encode: ``outputs`` (one output, or an object of
    output name -> output) and, when the first output is ``[batch, classes]`` scores, ``top_k``:
    each item's best ``k`` classes."""
    if len(outputs) == 1:
        body: dict[str, Any] = {"outputs": outputs[0]}
    else:
        body = {"outputs": {spec.name: out for spec, out in zip(predictor.outputs, outputs)}}
    scores = outputs[0]
    if scores.ndim == 2 and scores.shape[1] > 0:
        indices, values = top_k(scores, k)
        body["top_k"] = [
            {"indices": row, "scores": best, "labels": [class_label(predictor.labels, int(j)) for j in row]}
            for row, best in zip(indices, values)
        ]
    return body


def json_bytes(body: Any) -> bytes:
    """``body`` as JSON, numpy arrays as nested lists (non-finite numbers as ``null``)."""
    return orjson.dumps(body, default=_as_list, option=JSON_OPTIONS)


def _as_list(value: Any) -> Any:
    """What orjson writes for an array it does not write itself: a C-contiguous copy when that is
    all it lacks (so a float32 keeps its shortest form), else nested lists."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf" and not value.flags.c_contiguous:
        return np.ascontiguousarray(value)
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
