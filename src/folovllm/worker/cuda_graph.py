"""CUDA graphs for decode steps: the whole model forward replayed with one launch.

A decode step of a small model is hundreds of tiny kernels; launched one by one
from Python, the GPU waits on the host between them. A CUDA graph records the
launches of one forward once and replays them as a unit. What a graph records is
fixed: kernel arguments, grid sizes and every tensor's address. So:

* inputs live in persistent buffers (``worker/buffers.py``) whose device twins
  the graph reads; a step copies its values in, then replays;
* one graph per batch size of a ladder (1, 2, 4, 8, 16, ...); a step of 13
  sequences replays the 16 graph, its 3 padding rows carry slot -1 (nothing
  stored) and context length 0 (nothing attended);
* attention is planned for the size and the longest context the graph will ever
  see (``AttentionBackend.build_for_capture``): lengths are read on the device.

Prefills and mixed steps have ragged shapes with too many variants to capture
and are compute-bound anyway, so they stay eager (vLLM's "piecewise" graphs are
the refinement). Graphs share one memory pool and are captured largest first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from folovllm.attention.backends.abstract import AttentionMetadata


def capture_sizes(max_num_seqs: int, sizes: list[int] | None = None) -> list[int]:
    """The batch sizes to capture: the given ones, else 1, 2, 4 then every 8 (vLLM's ladder), up to
    ``max_num_seqs``."""
    if sizes is None:
        sizes = [1, 2, 4, *range(8, max_num_seqs + 8, 8)]
    return sorted({min(s, max_num_seqs) for s in sizes})


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    output: torch.Tensor
    metadata: Any


class CUDAGraphRunner:
    """Captures ``forward(num_seqs, metadata)`` at each size and replays the smallest one that fits."""

    def __init__(
        self,
        sizes: list[int],
        forward: Callable[[int, Any], torch.Tensor],
        capture_metadata: Callable[[int], AttentionMetadata],
        reset_inputs: Callable[[int], None],
        device: torch.device,
    ) -> None:
        self.sizes = sizes
        self._forward = forward
        self._capture_metadata = capture_metadata
        self._reset_inputs = reset_inputs
        self.device = device
        self.graphs: dict[int, _Graph] = {}
        self.capture_seconds = 0.0
        self.memory_bytes = 0

    def padded_size(self, num_seqs: int) -> int | None:
        """The captured size a decode step of ``num_seqs`` sequences replays (None: run it eagerly)."""
        for size in self.sizes:
            if size >= num_seqs:
                return size
        return None

    @torch.inference_mode()
    def capture(self, sizes: list[int] | None = None) -> None:
        """Capture every size (largest first, one shared pool); records time and device memory taken."""
        start = time.perf_counter()
        torch.cuda.synchronize(self.device)
        free_before = torch.cuda.mem_get_info(self.device)[0]
        reserved_before = torch.cuda.memory_reserved(self.device)
        pool = None
        for size in sorted(sizes or self.sizes, reverse=True):
            self._reset_inputs(size)
            metadata = self._capture_metadata(size)
            self._forward(size, metadata)  # warm-up: Triton compiles, allocator settles, outside the graph
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                output = self._forward(size, metadata)
            pool = graph.pool()
            self.graphs[size] = _Graph(graph, output, metadata)
        torch.cuda.synchronize(self.device)
        # The driver's view misses memory the allocator had cached; its own view misses cuBLAS workspaces.
        self.memory_bytes = max(
            free_before - torch.cuda.mem_get_info(self.device)[0], torch.cuda.memory_reserved(self.device) - reserved_before
        )
        self.capture_seconds = time.perf_counter() - start

    def replay(self, size: int) -> torch.Tensor:
        """Replay the graph of ``size`` on whatever the input buffers hold now; returns its output buffer."""
        entry = self.graphs[size]
        entry.graph.replay()
        return entry.output

    def release(self) -> None:
        self.graphs.clear()
