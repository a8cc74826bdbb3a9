"""Image files -> model input arrays, as an exported model's preprocessing metadata says.

Needs Pillow: ``pip install 'bnfold[images]'``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import UsageError
from .metadata import Preprocess

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
    """Read, resize and normalise images into a float32 ``[N, C, H, W]`` array."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise UsageError("reading images needs Pillow: pip install 'bnfold[images]'") from exc
    height, width = preprocess.size
    mean = np.asarray(preprocess.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(preprocess.std, dtype=np.float32).reshape(-1, 1, 1)
    batch = np.empty((len(paths), preprocess.channels, height, width), dtype=np.float32)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                mode = "L" if preprocess.channel_order == "L" else "RGB"
                pixels = np.asarray(img.convert(mode).resize((width, height), Image.BILINEAR), dtype=np.float32)
        except (OSError, UnidentifiedImageError) as exc:
            raise UsageError(f"{path}: not a readable image ({exc})") from exc
        chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        if preprocess.channel_order == "BGR":
            chw = chw[::-1]
        batch[i] = (chw * preprocess.scale - mean) / std
    return batch
