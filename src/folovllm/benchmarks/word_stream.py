"""A roofline twin of the W4A16 GEMV for ``bench gptq``: the same launch, the same loads, no arithmetic.

Each program of ``_gptq_gemv_kernel`` walks its split of K in ``[16, BLOCK_N]`` tiles of packed
words. This kernel runs the same grid, tile loop, warps and stages, and only XORs the words it
loads (so the loads cannot be dropped). If the GEMV is as slow as this, its launch shape and load
loop are the limit, not the unpacking and multiply-adds; if it is much slower, they are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from folovllm.model_executor.layers.quantization.ops.gptq_gemm import SLICE_ROWS, GemmPlan
from folovllm.triton_utils import for_device
from folovllm.utils import cdiv


@triton.jit
def _stream_words_kernel(QWeight, Out, N, num_blocks, blocks_per_split, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    """Grid ``(1, N tiles, splits)``: XOR of this split's words, one int32 per column."""
    split = tl.program_id(2)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    t = tl.arange(0, ROWS)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.int32)
    first = split * blocks_per_split
    for blk in range(first, tl.minimum(first + blocks_per_split, num_blocks)):
        acc ^= tl.load(QWeight + (blk * ROWS + t)[:, None] * N + rn[None, :], mask=n_ok[None, :], other=0)
    tl.store(Out + split * N + rn, tl.xor_sum(acc, axis=0), mask=n_ok)


def stream_words(qweight: torch.Tensor, plan: GemmPlan) -> torch.Tensor:
    """``[split_k, N]``: per split of ``plan``, the XOR of every word it reads from ``qweight [K/8, N]``."""
    rows, n = qweight.shape
    out = torch.empty(plan.split_k, n, dtype=torch.int32, device=qweight.device)
    grid = (1, cdiv(n, plan.block_n), plan.split_k)
    for_device(_stream_words_kernel, qweight.device)[grid](
        qweight, out, n, rows // SLICE_ROWS, plan.blocks_per_split, BLOCK_N=plan.block_n, ROWS=SLICE_ROWS,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )  # fmt: skip
    return out
