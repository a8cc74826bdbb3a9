"""Deterministic datasets for the sample models: real digits, generated shapes and signals."""

from __future__ import annotations

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
SIGNALS = ("sine", "square", "sawtooth", "noise")
PALETTE = np.array(
    [[1, 0.2, 0.2], [0.2, 0.9, 0.2], [0.2, 0.4, 1], [1, 1, 0.2], [1, 0.3, 1], [0.2, 1, 1]], dtype=np.float32
)


def digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (shipped with the package), standardised; 80/20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0 - 0.3) / 0.4
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order][:, None], y[order]
    cut = int(0.8 * len(x))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def _shape_mask(kind: int, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    if kind == 0:
        return dx**2 + dy**2 <= r**2
    if kind == 1:
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if kind == 2:
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    return ((np.abs(dx) <= r * 0.3) & (np.abs(dy) <= r)) | ((np.abs(dy) <= r * 0.3) & (np.abs(dx) <= r))


def shapes(n: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coloured shapes on noisy backgrounds: images [n,3,size,size], shape labels [n], masks [n,size,size]."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, 3, size, size), dtype=np.float32)
    labels = rng.integers(0, len(SHAPES), n)
    masks = np.empty((n, size, size), dtype=np.int64)
    for i in range(n):
        r = rng.uniform(size * 0.2, size * 0.35)
        cx, cy = rng.uniform(r, size - r, 2)
        mask = _shape_mask(int(labels[i]), size, cx, cy, r)
        background = rng.uniform(0, 0.5, 3).astype(np.float32)
        img = background[:, None, None] + rng.normal(0, 0.15, (3, size, size)).astype(np.float32)
        img[:, mask] += PALETTE[rng.integers(len(PALETTE))][:, None] * rng.uniform(0.6, 1.0)
        images[i], masks[i] = (img - 0.5) / 0.5, mask
    return images, labels.astype(np.int64), masks


def signals(n: int, seed: int, length: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Noisy sine / square / sawtooth / noise signals [n,1,length] with their class [n]."""
    rng = np.random.default_rng(seed)
    t = np.arange(length, dtype=np.float32)
    labels = rng.integers(0, len(SIGNALS), n)
    x = np.empty((n, 1, length), dtype=np.float32)
    for i in range(n):
        phase = 2 * np.pi * (t * rng.uniform(1 / 24, 1 / 6) + rng.uniform())
        base = [np.sin(phase), np.sign(np.sin(phase)), ((phase / np.pi) % 2) - 1, rng.normal(0, 0.7, length)][labels[i]]
        x[i, 0] = rng.uniform(0.5, 2.0) * base + rng.normal(0, 0.3, length) + rng.uniform(-1, 1)
    return x, labels.astype(np.int64)
