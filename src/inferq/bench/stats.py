"""percentile: the nearest-rank quantile every benchmark figure and test report uses."""

from __future__ import annotations

from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q`` quantile (0 <= q <= 1) of ``values``, by nearest rank: the value at index
    ``round(q * (n - 1))`` of the sorted values (Python's round, so halves go to even).

    The values need not be sorted. Raises ValueError when there are none.
    """
    ordered = sorted(values)
    if not ordered:
        raise ValueError("the percentile of no values")
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
