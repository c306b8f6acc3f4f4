"""Small arithmetic the engine repeats everywhere, written once."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import accumulate


def cdiv(a: int, b: int) -> int:
    """Ceiling division: how many ``b``-sized pieces hold ``a`` items."""
    return -(-a // b)


def prefix_sums(values: Iterable[int]) -> list[int]:
    """``[0, v0, v0 + v1, ...]``: the start offsets of ragged rows plus the total."""
    return list(accumulate(values, initial=0))
