"""How far a quantized model's outputs are from the reference's: signal-to-quantization-noise
ratio, normwise max relative error and top-1 agreement, accumulated over batches."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..report import Int8Output


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """``10·log10(signal_power / noise_power)``: ``inf`` without noise, ``-inf`` without signal."""
    if noise_power == 0:
        return math.inf
    if signal_power == 0:
        return -math.inf
    return 10 * math.log10(signal_power / noise_power)


def is_classifier(shape: tuple[int, ...]) -> bool:
    """Whether an output of ``shape`` is classifier-shaped: ``[N, C]`` with at least two classes."""
    return len(shape) == 2 and shape[1] >= 2


@dataclass
class OutputError:
    """One output's distance from the reference, accumulated batch by batch."""

    name: str
    signal_power: float = 0.0
    """``Σ y_ref²``."""
    noise_power: float = 0.0
    """``Σ (y - y_ref)²``."""
    max_abs_error: float = 0.0
    ref_max_abs: float = 0.0
    rows: int = 0
    agreeing_rows: int = 0
    problem: str | None = None

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        """Compare one batch of this output."""
        if ref.shape != got.shape:
            self.problem = f"shape {got.shape} in ONNX but {ref.shape} in PyTorch"
            return
        if not np.isfinite(got).all():
            self.problem = "NaN/inf in the INT8 model's output"
            return
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        noise = got64 - ref64
        self.signal_power += float(np.square(ref64).sum())
        self.noise_power += float(np.square(noise).sum())
        if ref.size:
            self.max_abs_error = max(self.max_abs_error, float(np.abs(noise).max()))
            self.ref_max_abs = max(self.ref_max_abs, float(np.abs(ref64).max()))
        if is_classifier(ref.shape):
            self.rows += ref.shape[0]
            self.agreeing_rows += int((ref64.argmax(1) == got64.argmax(1)).sum())

    @property
    def sqnr_db(self) -> float:
        return sqnr_db(self.signal_power, self.noise_power)

    @property
    def agreement(self) -> float | None:
        """Fraction of rows with the same top-1; ``None`` for an output that is not classifier-shaped."""
        return self.agreeing_rows / self.rows if self.rows else None

    def judge(self, min_agreement: float, min_sqnr_db: float) -> Int8Output:
        """This output's line of the report: passed iff no problem, SQNR at least ``min_sqnr_db``
        and (classifier outputs) top-1 agreement at least ``min_agreement``."""
        agreement = None if self.problem else self.agreement
        sqnr = -math.inf if self.problem else self.sqnr_db
        passed = self.problem is None and sqnr >= min_sqnr_db and (agreement is None or agreement >= min_agreement)
        return Int8Output(
            name=self.name,
            sqnr_db=sqnr,
            max_rel_error=self.max_abs_error / self.ref_max_abs if self.ref_max_abs else self.max_abs_error,
            top1_agreement=agreement,
            passed=passed,
            problem=self.problem,
        )
