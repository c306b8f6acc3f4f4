"""CUDA graphs: a whole model forward replayed with one launch.

A step of a small model is hundreds of tiny kernels; launched one by one from
Python, the GPU waits on the host between them. A CUDA graph records the
launches of one forward once and replays them as a unit. What a graph records is
fixed: kernel arguments, grid sizes and every tensor's address. So:

* inputs live in persistent buffers (``worker/buffers.py``) whose device twins
  the graph reads; a step copies its values in, then replays;
* one graph per size of a ladder; a step pads up to the next captured size with
  rows that store nothing (slot -1) and attend to nothing (context length 0);
* attention is planned for the size and the longest context the graph will ever
  see (``AttentionBackend.build_for_capture``): lengths are read on the device.

Two ladders (vLLM's ``cudagraph_mode``): decode steps by batch size (1, 2, 4,
8, ... sequences of one token, M4), and with ``"FULL"`` any step by its token
count (M5: prompt chunks and mixed steps), attention planned for as many
sequences as the step could hold. Steps past the largest size run eagerly; they
are big enough to keep the GPU busy without help. All graphs share one memory
pool and are captured largest first.
"""

from __future__ import annotations

import gc
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


def mixed_capture_sizes(max_tokens: int) -> list[int]:
    """Token counts to capture for mixed steps: 16, 32, 64, then every 64 to 512, every 256 after, up to
    ``max_tokens``. A step pads at most 63 rows up to 512 tokens and 255 past them, where a row's
    share of the step's cost is small."""
    sizes = [16, 32, *range(64, 512, 64), *range(512, max_tokens + 256, 256)]
    return sorted({min(s, max_tokens) for s in sizes})


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    output: torch.Tensor
    metadata: Any


class CUDAGraphRunner:
    """Captures ``forward(size, metadata)`` at each size and replays the smallest one that fits.

    ``pad_inputs(size, num_seqs, num_tokens)`` turns everything in the buffers past
    a step's real sequences and tokens into padding, up to ``size``.
    """

    def __init__(
        self,
        sizes: list[int],
        forward: Callable[[int, Any], torch.Tensor],
        capture_metadata: Callable[[int], AttentionMetadata],
        pad_inputs: Callable[..., None],
        device: torch.device,
    ) -> None:
        self.sizes = sizes
        self._forward = forward
        self._capture_metadata = capture_metadata
        self.pad_inputs = pad_inputs
        self.device = device
        self.graphs: dict[int, _Graph] = {}
        self.pool: Any = None
        self.capture_seconds = 0.0
        self.memory_bytes = 0

    def padded_size(self, n: int) -> int | None:
        """The captured size a step of ``n`` (sequences or tokens) replays (None: run it eagerly)."""
        for size in self.sizes:
            if size >= n:
                return size
        return None

    @torch.inference_mode()
    def capture(self, sizes: list[int] | None = None, pool: Any = None) -> None:
        """Capture every size (largest first, into ``pool`` or a new one shared by all of them);
        records time and device memory taken."""
        start = time.perf_counter()
        # torch.cuda.graph collects garbage and empties the allocator's cache on entry: do it first, or memory
        # an earlier, unreferenced engine still held would be returned mid-capture and counted against the graphs.
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize(self.device)
        free_before = torch.cuda.mem_get_info(self.device)[0]
        reserved_before = torch.cuda.memory_reserved(self.device)
        for size in sorted(sizes or self.sizes, reverse=True):
            self.pad_inputs(size)
            metadata = self._capture_metadata(size)
            self._forward(size, metadata)  # warm-up: Triton compiles, allocator settles, outside the graph
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                output = self._forward(size, metadata)
            pool = self.pool = graph.pool()
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


def capture_in_one_pool(runners: list[CUDAGraphRunner], largest_only: bool = False) -> None:
    """Capture each runner in turn (put the one with the largest graphs first) into one shared memory
    pool; ``largest_only`` captures each runner's largest size alone (a memory probe)."""
    pool = None
    for runner in runners:
        runner.capture([runner.sizes[-1]] if largest_only else None, pool)
        pool = runner.pool
