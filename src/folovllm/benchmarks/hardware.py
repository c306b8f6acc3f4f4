"""The two ceilings every roofline number in the book is divided by, measured on the card in use.

Memory-bound work (decode, attention over the KV cache) is compared with a plain
device-to-device copy; compute-bound work (prefill) with one large matmul.
Datasheet peaks are never reached, so a measured ceiling makes "% of roofline"
honest and reproducible.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from folovllm.utils import cdiv


def median_time_s(fn: Callable[[], object], device: torch.device | str, warmup: int = 3, iters: int = 10) -> float:
    """Median time of ``fn()`` in seconds: CUDA events on GPU, which include the host's launch of a kernel
    shorter than that launch (``graph_time_s`` times the GPU alone), wall clock on CPU."""
    device = torch.device(device)
    if warmup < 0 or iters < 1:
        raise ValueError(f"warmup must be >= 0 and iters >= 1, got warmup={warmup}, iters={iters}")
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def graph_time_s(fns: list[Callable[[], object]], device: torch.device | str, replays: int = 10) -> float:
    """GPU time of one call, averaged over ``fns`` captured back to back in one CUDA graph and replayed.

    Events around a single eager launch time the host's launch as well, which for a kernel of a few
    microseconds is most of what they see (a Triton launch costs tens of microseconds of Python);
    decode runs its kernels from a graph, so this is the time that matters there. Give ``fns`` that
    read different copies of their weights, more bytes in all than the L2 cache holds, or the replays
    would read weights from L2 as a real model's next layer never does.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"graph_time_s needs a CUDA device, got {device}")
    for fn in fns:  # compile, allocate scratch outside the capture
        fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / (replays * len(fns))


def copies_beyond_l2(num_bytes: int, device: torch.device, at_least: int = 2, at_most: int = 16) -> int:
    """How many copies of a ``num_bytes`` operand add up to four times the L2 cache (within bounds)."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(at_least, min(at_most, cdiv(4 * l2, max(num_bytes, 1))))


def measure_copy_bandwidth(device: torch.device | str, num_bytes: int | None = None) -> float:
    """Achieved memory bandwidth in GB/s of a ``num_bytes`` copy (read + write bytes counted).

    Defaults to 1 GiB on CUDA (far beyond any cache) and 64 MiB on CPU.
    """
    device = torch.device(device)
    if num_bytes is None:
        num_bytes = 2**30 if device.type == "cuda" else 2**26
    if num_bytes < 1:
        raise ValueError(f"num_bytes must be positive, got {num_bytes}")
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    seconds = median_time_s(lambda: dst.copy_(src), device)
    return 2 * num_bytes / seconds / 1e9


def measure_matmul_tflops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, n: int | None = None) -> float:
    """Achieved TFLOP/s of an ``n x n @ n x n`` matmul (``2 n^3`` FLOPs); n = 8192 on CUDA, 512 on CPU."""
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 512
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    seconds = median_time_s(lambda: a @ b, device)
    return 2 * n**3 / seconds / 1e12
