"""Shared test helpers: non-trivial batch-norm statistics, tolerance checks, ONNX inspection, image files,\na umask for the duration."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

import bnfold


def randomize_batchnorms(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch-norm statistics far from the identity (mean +-2, var 0.05..4, gamma, beta)."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            if m.track_running_stats:
                m.running_mean.copy_(torch.rand(n, generator=gen) * 4 - 2)
                m.running_var.copy_(torch.rand(n, generator=gen) * 3.95 + 0.05)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=gen) * 2 - 0.5)
                m.bias.data.copy_(torch.rand(n, generator=gen) * 2 - 1)
    return module.eval()


# The tests' own float32 tolerances (never the product's): float32 re-association error of a small
# folded network is ~1e-6 of the output scale.
FLOAT32_RTOL = 1e-4
FLOAT32_ATOL = 1e-5


def assert_close(
    reference: torch.Tensor, candidate: torch.Tensor, rtol: float = FLOAT32_RTOL, atol: float = FLOAT32_ATOL
) -> None:
    """max|c - r| <= atol + rtol * max|r| (normwise)."""
    ref = reference.detach().double()
    err = float((candidate.detach().double() - ref).abs().max())
    bound = atol + rtol * float(ref.abs().max())
    assert err <= bound, f"max abs error {err:.3g} > {bound:.3g}"


def graph_batchnorm_ops(folded: bnfold.FoldResult) -> int:
    """Batch-norm ops left in a folded GraphModule."""
    return sum(n.op == "call_function" and "batch_norm" in str(n.target) for n in folded.module.graph.nodes)


def onnx_ops(path: str | Path, op_type: str) -> int:
    """Number of ``op_type`` nodes in an ONNX file's graph, its subgraphs and its local functions
    (read from the protobuf directly, independently of bnfold's own counting)."""

    def in_graph(graph: onnx.GraphProto) -> int:
        total = 0
        for node in graph.node:
            total += node.op_type == op_type
            for attr in node.attribute:
                total += sum(in_graph(g) for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs))
        return total

    model = onnx.load(str(path))
    return in_graph(model.graph) + sum(n.op_type == op_type for f in model.functions for n in f.node)


def onnx_batchnorms(path: str | Path) -> int:
    return onnx_ops(path, "BatchNormalization")


def random_input(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def corrupt_output_folds(monkeypatch) -> None:
    """Make every folded weight come out with one channel 1% wrong *after* the float64 proof
    passed (a bug in the final cast): an export that must fail verification, whatever the
    tolerances and float64 arbitration allow."""
    from bnfold.folding.store import TensorStore

    real = TensorStore.finalize

    def wrong(self):
        weights = [target for target in self.pending if target.endswith("_weight")]
        real(self)
        for target in weights:
            self.program.constants[target][0] *= 1.01

    monkeypatch.setattr(TensorStore, "finalize", wrong)


def write_pngs(x: np.ndarray, folder: Path) -> list[Path]:
    """Samples normalised with mean 0.5, std 0.5 (the shapes test sets) back to 8-bit RGB files
    ``img_000.png``, ... in ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, chw in enumerate(x):
        pixels = np.clip((chw * 0.5 + 0.5) * 255 + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)
        paths.append(folder / f"img_{i:03d}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """The process's umask set to ``mask`` for the duration."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)
