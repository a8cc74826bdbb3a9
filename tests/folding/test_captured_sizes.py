"""Dynamic image sizes in the fold: the sizes a captured program takes are read from torch's
guards (a multiple of the total stride from a smallest size), the proof runs at a second size,
and a model whose code fixes its size is refused naming the op and the line."""

from __future__ import annotations

import inspect

import pytest
import torch
from sized_models import CachedGrid, HardReshape, PositionalEmbedding, UNetLike, model

import bnfold
from bnfold.image_sizes import AxisSizes


def test_an_encoder_decoder_takes_multiples_of_its_stride_and_is_proven_at_a_second_size():
    result = bnfold.fold(model(UNetLike), (torch.randn(1, 3, 32, 32),), dynamic_size=True)
    (sizes,) = result.report.image_sizes
    assert (sizes.height, sizes.width, sizes.example) == (AxisSizes(16, 8), AxisSizes(16, 8), (32, 32))
    assert result.report.folded_count == 7 and result.report.kept_count == 0
    proof = result.report.proof
    assert proof.passed and proof.inputs == 3 and proof.samples == 3  # example + probe, then the probe at 24x32
    assert "Image size: dynamic, height a multiple of 8, at least 16" in str(result.report)
    assert result.report.to_dict()["image_sizes"][0]["width"] == {"min": 16, "multiple_of": 8, "max": None}
    x = torch.randn(2, 3, 40, 24)  # the folded program takes another size
    torch.testing.assert_close(result.module(x), model(UNetLike)(x), rtol=1e-4, atol=1e-5)


def _line(kind: type) -> int:
    lines, first = inspect.getsourcelines(kind.forward)
    return first + next(i for i, text in enumerate(lines) if "# fixes the size" in text)


@pytest.mark.parametrize(
    ("kind", "op"),
    [(HardReshape, "aten.view"), (PositionalEmbedding, "aten.add.Tensor"), (CachedGrid, "aten.add.Tensor")],
    ids=["hard-coded reshape", "positional embedding", "cached grid"],
)
def test_a_model_whose_code_fixes_its_size_is_refused_naming_the_op_and_line(kind, op):
    x = (torch.randn(1, 3, 16, 16),)
    path = inspect.getsourcefile(kind)
    with pytest.raises(bnfold.FoldError) as caught:
        bnfold.fold(model(kind), x, dynamic_size=True)
    message = str(caught.value)
    assert message.startswith("the model cannot take a dynamic image size: its code ")
    assert f" in {op} at {path}:{_line(kind)} (`" in message
    assert message.endswith("without `dynamic_size=True`")
    assert bnfold.fold(model(kind), x).report.image_sizes is None  # at its fixed size it folds


def test_dynamic_size_needs_an_image_like_input():
    with pytest.raises(bnfold.UsageError, match=r"`dynamic_size` frees the height and width .* takes 1x10"):
        bnfold.fold(torch.nn.Linear(10, 2).eval(), (torch.randn(1, 10),), dynamic_size=True)
