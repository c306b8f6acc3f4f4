"""Split-K for decode GEMMs: several programs share one output tile's K range and meet in one launch.

A decode step multiplies a few rows by a weight, so an output tile per program leaves most SMs idle
while the weight streams; splitting K gives every SM a share of the bytes. The splits of one output
tile meet through a counter: each writes its fp32 partial sum, and the last to arrive adds them up in
split order (deterministic, unlike float atomics) and resets the counter, so one launch does it all
and a CUDA graph can replay it (the counters: ``triton_utils/counters.py``). Used by the W4A16 GPTQ
kernels (M7) and the skinny GEMM (M4).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def store_tile(
    acc, Out, Bias, Partials, Counters, rm, rn, m_ok, n_ok, M, N, split, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr
):
    """Write one fp32 output tile: directly, or (split-K) as a partial that the tile's last split adds up.

    Each split writes its partial, then counts its arrival; the last to arrive sums all partials in
    split order (deterministic) and resets the counter for the next launch (CUDA-graph replay)."""
    out_mask = m_ok[:, None] & n_ok[None, :]
    store_mask = out_mask
    if SPLIT_K > 1:
        partials = Partials + rm.to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(partials + split * M * N, acc, mask=out_mask)
        tl.debug_barrier()  # all of this program's partial is written before its arrival is counted
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        arrived = tl.atomic_add(Counters + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the tile's last split: every other partial is visible now
            acc = tl.zeros_like(acc)
            for other in tl.static_range(SPLIT_K):
                acc += tl.load(partials + other * M * N, mask=out_mask, other=0.0)
            tl.atomic_xchg(Counters + tile, 0)  # ready for the next launch
        store_mask = out_mask & (arrived == SPLIT_K - 1)  # the other splits store nothing
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Out + rm.to(tl.int64)[:, None] * N + rn[None, :], acc.to(Out.dtype.element_ty), mask=store_mask)
