"""percentile: nearest rank on hand-computed samples."""

from __future__ import annotations

import pytest

from inferq.bench.stats import percentile

# 1..100 in a shuffled order: the quantile must not depend on the order it is given.
HUNDRED = [float((i * 37) % 100 + 1) for i in range(100)]


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        (0.0, 1.0),  # index round(0 * 99) = 0
        (0.5, 51.0),  # index round(49.5) = 50 (a half goes to the even index)
        (0.9, 90.0),  # index round(89.1) = 89
        (0.99, 99.0),  # index round(98.01) = 98
        (1.0, 100.0),  # index 99, the maximum
    ],
)
def test_percentile_is_the_nearest_rank_of_the_sorted_values(q: float, expected: float) -> None:
    assert sorted(HUNDRED) == [float(i) for i in range(1, 101)]
    assert percentile(HUNDRED, q) == expected


def test_percentile_rounds_halves_to_the_even_index() -> None:
    # 0.99 * (51 - 1) = 49.5 -> index 50; 0.5 * (2 - 1) = 0.5 -> index 0; 0.5 * 3 = 1.5 -> 2.
    assert percentile([float(i) for i in range(51)], 0.99) == 50.0
    assert percentile([7.0, 3.0], 0.5) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 3.0


def test_percentile_of_one_value_is_that_value() -> None:
    assert percentile([2.5], 0.0) == percentile([2.5], 0.99) == 2.5


def test_percentile_of_no_values_is_an_error() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)
