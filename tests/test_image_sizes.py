"""Size rules: which heights and widths an axis takes, the phrase naming them, and the sizes
verification tries (smaller and larger than the example, never square)."""

from __future__ import annotations

import pytest

from bnfold.image_sizes import AxisSizes, ImageSizes

STRIDE_8 = AxisSizes(16, 8)


def test_an_axis_takes_its_minimum_plus_multiples_of_its_step_up_to_its_maximum():
    assert [v for v in range(1, 50) if STRIDE_8.allows(v)] == [16, 24, 32, 40, 48]
    assert [v for v in range(1, 20) if AxisSizes(5, 4, 13).allows(v)] == [5, 9, 13]
    assert (STRIDE_8.at_most(30), STRIDE_8.at_least(30), STRIDE_8.at_most(15)) == (24, 32, None)
    assert AxisSizes(5, 4, 13).at_least(14) is None


@pytest.mark.parametrize(
    ("rule", "text"),
    [
        (AxisSizes(16, 8), "a multiple of 8, at least 16"),
        (AxisSizes(5), "at least 5"),
        (AxisSizes(5, 4, 13), "5 plus a multiple of 4, at most 13"),
    ],
)
def test_rules_read_as_min_and_multiple_of(rule, text):
    assert str(rule) == text


def test_a_size_it_does_not_take_is_named_with_the_allowed_ones_and_the_nearest():
    sizes = ImageSizes(STRIDE_8, AxisSizes(8, 8), (32, 32))
    assert sizes.problem(32, 40) is None
    assert sizes.problem(30, 8) == "height 30: expected a multiple of 8, at least 16 (nearest: 24 or 32)"
    assert "; width 9: expected a multiple of 8, at least 8 (nearest: 8 or 16)" in sizes.problem(30, 9)


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        (ImageSizes(STRIDE_8, STRIDE_8, (32, 32)), [(32, 32), (24, 32), (40, 48)]),
        (ImageSizes(AxisSizes(5), AxisSizes(5), (32, 48)), [(32, 48), (24, 36), (40, 72)]),
        # the smallest size already: two larger sizes
        (ImageSizes(AxisSizes(32, 32), AxisSizes(32, 32), (32, 32)), [(32, 32), (64, 96), (96, 64)]),
        # the only smaller size would be square: two larger sizes
        (ImageSizes(AxisSizes(32, 16), AxisSizes(32, 16), (48, 32)), [(48, 32), (80, 48), (64, 48)]),
    ],
)
def test_verification_tries_the_example_and_two_other_allowed_sizes_neither_square(sizes, expected):
    tried = sizes.verification_sizes()
    assert tried == expected
    assert all(sizes.allows(*size) for size in tried) and all(h != w for h, w in tried[1:])


def test_rules_round_trip_through_their_metadata_form():
    sizes = ImageSizes(AxisSizes(5, 4, 13), STRIDE_8, (9, 24))
    assert ImageSizes.from_dict(sizes.to_dict()) == sizes
    assert sizes.to_dict()["height"] == {"min": 5, "multiple_of": 4, "max": 13}
