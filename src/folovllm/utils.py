"""Small helpers the engine repeats everywhere, written once."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import accumulate

import torch


def cdiv(a: int, b: int) -> int:
    """Ceiling division: how many ``b``-sized pieces hold ``a`` items."""
    return -(-a // b)


def prefix_sums(values: Iterable[int]) -> list[int]:
    """``[0, v0, v0 + v1, ...]``: the start offsets of ragged rows plus the total."""
    return list(accumulate(values, initial=0))


def to_device(values: Sequence[int] | Sequence[float], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A short host list as a tensor on ``device``, without stalling the host.

    ``torch.tensor(values, device="cuda")`` copies from pageable memory, and PyTorch then waits
    for the stream to drain: the host stops until every kernel queued before it has run,
    which undoes async scheduling (the GPU idles while the host builds the next step).
    Staged in pinned memory, the copy is queued like a kernel; PyTorch's caching host
    allocator keeps the staging buffer until the copy has run.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
