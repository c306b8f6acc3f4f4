"""Arrival counters for kernels whose programs meet in one launch (split-K GEMMs, split-K attention).

The programs that share one output tile count their arrivals in an int32 counter; the last to arrive
finishes the tile and resets the counter to zero, so the same counters serve every later launch on the
device and a CUDA graph can replay them. One zeroed array per device, shared by every such kernel
(they run one after another on the stream).
"""

from __future__ import annotations

import torch

_counters: dict[torch.device, torch.Tensor] = {}


def tile_counters(device: torch.device, num_tiles: int) -> torch.Tensor:
    """Zeroed int32 arrival counters, one per output tile, shared by every launch on ``device``
    (each launch leaves them at zero again)."""
    counters = _counters.get(device)
    if counters is None or counters.numel() < num_tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "split-K counters must be allocated by a warm-up launch before CUDA graph "
                "capture (a graph keeps the old address)"
            )
        counters = torch.zeros(max(num_tiles, 1024), dtype=torch.int32, device=device)
        _counters[device] = counters
    return counters
