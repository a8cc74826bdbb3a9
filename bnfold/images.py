"""Image files -> model input arrays, as an exported model's preprocessing metadata says.

Needs Pillow: ``pip install 'bnfold[images]'``.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import BinaryIO

import numpy as np

from .errors import UsageError
from .metadata import Preprocess

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def image_elements(source: BinaryIO) -> int:
    """The values an image file decodes to (width x height x bands), read from its header only; 0
    when it is not an image Pillow can identify (:func:`load_image` then says why), and
    ``sys.maxsize`` for an image over Pillow's own decompression-bomb limit."""
    pil = _pillow()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pil.DecompressionBombWarning)
            with pil.open(source) as img:
                return img.width * img.height * len(img.getbands())
    except pil.DecompressionBombError:
        return sys.maxsize
    except Exception:  # not an image, or a corrupt header: load_image reports it
        return 0


def load_images(paths: Sequence[str | os.PathLike[str]], preprocess: Preprocess) -> np.ndarray:
    """Read, resize and normalise images into a float32 ``[N, C, H, W]`` array; without a
    preprocessing size (a dynamic-size model) the images must be of one size (see
    :func:`group_by_size`), else a :class:`UsageError` naming two that differ."""
    images = [load_image(path, preprocess) for path in paths]
    sizes = {image.shape[1:]: path for image, path in zip(images, paths)}
    if len(sizes) > 1:
        (one, first), (other, second) = list(sizes.items())[:2]
        raise UsageError(
            f"{first} is {one[0]}x{one[1]} but {second} is {other[0]}x{other[1]}: images of different sizes "
            "cannot form one batch (a batch is never padded)"
        )
    if not images:
        height, width = preprocess.size or (0, 0)
        return np.empty((0, preprocess.channels, height, width), dtype=np.float32)
    return np.stack(images)


def image_size(source: str | os.PathLike[str]) -> tuple[int, int]:
    """The ``(height, width)`` of an image file (read from its header); a :class:`UsageError` if
    it is not a readable image."""
    pil = _pillow()
    try:
        with pil.open(source) as img:
            width, height = img.size
    except (pil.UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UsageError(f"{source}: not a readable image ({exc})") from exc
    return height, width


def group_by_size(paths: Sequence[str | os.PathLike[str]], preprocess: Preprocess) -> list[list[int]]:
    """The indices of ``paths`` in groups of images that come out of ``preprocess`` at one size,
    in order of first appearance: one group when it resizes every image to its size."""
    if preprocess.size is not None:
        return [list(range(len(paths)))] if paths else []
    groups: dict[tuple[int, int], list[int]] = {}
    for i, path in enumerate(paths):
        groups.setdefault(image_size(path), []).append(i)
    return list(groups.values())


def load_image(
    source: str | os.PathLike[str] | BinaryIO, preprocess: Preprocess, name: str | None = None
) -> np.ndarray:
    """One image (a file, or an open binary file such as the bytes of an object in storage) read,
    resized (unless the preprocessing keeps each image's size) and normalised into a float32
    ``[C, H, W]`` array; errors name ``name`` (default: the path). A :class:`UsageError` if it is
    not a readable image."""
    pil = _pillow()
    label = name if name is not None else source
    try:
        with pil.open(source) as img:
            mode = "L" if preprocess.channel_order == "L" else "RGB"
            img = img.convert(mode)
            if preprocess.size is not None:
                img = img.resize((preprocess.size[1], preprocess.size[0]), pil.BILINEAR)
            pixels = np.asarray(img, dtype=np.float32)
    except pil.UnidentifiedImageError as exc:
        # Pillow names an open file by its repr (`<_io.BytesIO object at 0x...>`): name it ourselves.
        reason = str(exc) if isinstance(source, (str, os.PathLike)) else "cannot identify the image format"
        raise UsageError(f"{label}: not a readable image ({reason})") from exc
    except (OSError, SyntaxError, ValueError, EOFError, pil.DecompressionBombError) as exc:
        # What Pillow raises for truncated, corrupt or oversized files (OSError covers most).
        raise UsageError(f"{label}: not a readable image ({exc})") from exc
    chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    if preprocess.channel_order == "BGR":
        chw = chw[::-1]
    mean = np.asarray(preprocess.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(preprocess.std, dtype=np.float32).reshape(-1, 1, 1)
    return (chw * preprocess.scale - mean) / std


def _pillow() -> ModuleType:
    """``PIL.Image``, or a :class:`UsageError` saying which extra to install."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise UsageError("reading images needs Pillow: pip install 'bnfold[images]'") from exc
    return Image
