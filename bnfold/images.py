"""Image files -> model input arrays, as an exported model's preprocessing metadata says.

Needs Pillow: ``pip install 'bnfold[images]'``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import UsageError
from .metadata import Preprocess

PILLOW_NEEDED = "reading images needs Pillow: pip install 'bnfold[images]'"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def find_images(path: str | os.PathLike[str]) -> list[Path]:
    """An image file, or the image files of a folder (sorted, not recursive)."""
    root = Path(path)
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise UsageError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return files
    if not root.is_file():
        raise UsageError(f"{root} does not exist")
    return [root]


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
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise UsageError(PILLOW_NEEDED) from exc
    try:
        with Image.open(source) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
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
    resized (unless the preprocessing keeps each image's size) and normalised into a float32 ``[C, H, W]`` array; errors name ``name`` (default: the
    path). A :class:`UsageError` if it is not a readable image."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise UsageError(PILLOW_NEEDED) from exc
    label = name if name is not None else source
    try:
        with Image.open(source) as img:
            mode = "L" if preprocess.channel_order == "L" else "RGB"
            img = img.convert(mode)
            if preprocess.size is not None:
                img = img.resize((preprocess.size[1], preprocess.size[0]), Image.BILINEAR)
            pixels = np.asarray(img, dtype=np.float32)
    except UnidentifiedImageError as exc:
        # Pillow names an open file by its repr (`<_io.BytesIO object at 0x...>`): name it ourselves.
        reason = str(exc) if isinstance(source, (str, os.PathLike)) else "cannot identify the image format"
        raise UsageError(f"{label}: not a readable image ({reason})") from exc
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        # What Pillow raises for truncated, corrupt or oversized files (OSError covers most).
        raise UsageError(f"{label}: not a readable image ({exc})") from exc
    chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    if preprocess.channel_order == "BGR":
        chw = chw[::-1]
    mean = np.asarray(preprocess.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(preprocess.std, dtype=np.float32).reshape(-1, 1, 1)
    return (chw * preprocess.scale - mean) / std
