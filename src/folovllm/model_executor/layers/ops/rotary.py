"""RoPE on q and k in place, with Qwen3's per-head RMSNorm of q and k fused in front of it.

Unfused, each of q and k goes through a norm (several kernels), a gather of
cos/sin, two chunks, four multiplies, two adds and a concatenation. Here one
program per token loads every head of q and k once from the ``qkv`` projection
output, normalizes and rotates them in fp32 and writes them back in place, so
q, k and v stay views of that one buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from folovllm.triton_utils import for_device


@triton.jit
def _rope_heads(
    Base,
    Positions,
    CosSin,
    NormW,
    row,
    stride_t,
    eps,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HALF: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    """Rotate (and first normalize) the ``NUM_HEADS`` heads of one token that start at ``Base``."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = h < NUM_HEADS
    ptr = Base + row * stride_t + h * HEAD_DIM + d
    x1 = tl.load(ptr, mask=mask, other=0.0)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / HEAD_DIM + eps)
        w1 = tl.load(NormW + d).to(tl.float32)
        w2 = tl.load(NormW + HALF + d).to(tl.float32)
        a = (a * rstd[:, None]).to(x1.dtype).to(tl.float32) * w1
        b = (b * rstd[:, None]).to(x1.dtype).to(tl.float32) * w2
    pos = tl.load(Positions + row)
    cos = tl.load(CosSin + pos * (2 * HALF) + d)
    sin = tl.load(CosSin + pos * (2 * HALF) + HALF + d)
    tl.store(ptr, (a * cos - b * sin).to(x1.dtype), mask=mask)
    tl.store(ptr + HALF, (b * cos + a * sin).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_qk_kernel(
    Q,
    K,
    Positions,
    CosSin,
    QNormW,
    KNormW,
    stride_q,
    stride_k,
    eps,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    _rope_heads(Q, Positions, CosSin, QNormW, row, stride_q, eps, NUM_Q_HEADS, HEAD_DIM, BLOCK_HQ, HEAD_DIM // 2, HAS_NORM)
    _rope_heads(K, Positions, CosSin, KNormW, row, stride_k, eps, NUM_KV_HEADS, HEAD_DIM, BLOCK_HK, HEAD_DIM // 2, HAS_NORM)


def rotary_qk_(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> None:
    """Rotate ``q [T, Hq, D]`` and ``k [T, Hkv, D]`` in place by ``positions [T]``.

    ``cos_sin_cache [max_pos, D]`` holds cos for the first half, sin for the second
    (fp32). With norm weights, each head is RMS-normalized first (Qwen3).
    Heads of a token must be contiguous (``stride(1) == D``); rows may be strided.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if q.stride(1) != head_dim or k.stride(1) != head_dim or q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("q and k must hold each token's heads contiguously")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("q_norm_weight and k_norm_weight go together")
    if not num_tokens:
        return
    has_norm = q_norm_weight is not None
    for_device(_rotary_qk_kernel, q.device)[(num_tokens,)](
        q,
        k,
        positions,
        cos_sin_cache,
        q_norm_weight if has_norm else q,
        k_norm_weight if has_norm else k,
        q.stride(0),
        k.stride(0),
        eps,
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        HAS_NORM=has_norm,
        num_warps=4,
    )
