"""RoPE on q and k in place, with Qwen3's per-head RMSNorm of q and k fused in front of it,
and optionally the K/V store into the paged cache fused behind it.

Unfused, each of q and k goes through a norm (several kernels), a gather of
cos/sin, two chunks, four multiplies, two adds and a concatenation. Here one
program per token loads every head of q and k once from the ``qkv`` projection
output, normalizes and rotates them in fp32 and writes them back in place, so
q, k and v stay views of that one buffer. Given the cache, the same program
also writes the rotated K (still in registers) and V into the token's cache
slot: the attention backend's own store kernel, one launch per layer, is skipped.
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
    out1 = (a * cos - b * sin).to(x1.dtype)
    out2 = (b * cos + a * sin).to(x1.dtype)
    tl.store(ptr, out1, mask=mask)
    tl.store(ptr + HALF, out2, mask=mask)
    return out1, out2


@triton.jit
def _rotary_qk_kernel(
    Q,
    K,
    Positions,
    CosSin,
    QNormW,
    KNormW,
    V,
    KVCache,
    SlotMapping,
    stride_q,
    stride_k,
    stride_v,
    kv_stride,
    eps,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    HAS_NORM: tl.constexpr,
    STORE_KV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    _rope_heads(Q, Positions, CosSin, QNormW, row, stride_q, eps, NUM_Q_HEADS, HEAD_DIM, BLOCK_HQ, HEAD_DIM // 2, HAS_NORM)
    k1, k2 = _rope_heads(
        K, Positions, CosSin, KNormW, row, stride_k, eps, NUM_KV_HEADS, HEAD_DIM, BLOCK_HK, HEAD_DIM // 2, HAS_NORM
    )
    if STORE_KV:
        slot = tl.load(SlotMapping + row)
        if slot >= 0:  # slot -1: a padding token, nothing to store
            _store_slot(KVCache, V, k1, k2, slot, row, stride_v, kv_stride, NUM_KV_HEADS, HEAD_DIM, BLOCK_HK, HEAD_DIM // 2)


@triton.jit
def _store_slot(
    KVCache,
    V,
    k1,
    k2,
    slot,
    row,
    stride_v,
    kv_stride,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HALF: tl.constexpr,
):
    """Write one token's rotated K halves (still in registers) and its V into cache slot ``slot``."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = h < NUM_KV_HEADS
    dst = KVCache + slot * (NUM_KV_HEADS * HEAD_DIM) + h * HEAD_DIM + d
    tl.store(dst, k1.to(KVCache.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, k2.to(KVCache.dtype.element_ty), mask=mask)
    v = V + row * stride_v + h * HEAD_DIM + d
    tl.store(dst + kv_stride, tl.load(v, mask=mask), mask=mask)
    tl.store(dst + kv_stride + HALF, tl.load(v + HALF, mask=mask), mask=mask)


def rotary_qk_(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    v: torch.Tensor | None = None,
    kv_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
) -> None:
    """Rotate ``q [T, Hq, D]`` and ``k [T, Hkv, D]`` in place by ``positions [T]``.

    ``cos_sin_cache [max_pos, D]`` holds cos for the first half, sin for the second
    (fp32). With norm weights, each head is RMS-normalized first (Qwen3).
    Heads of a token must be contiguous (``stride(1) == D``); rows may be strided.
    With ``v``, ``kv_cache [2, blocks, block_size, Hkv, D]`` and ``slot_mapping [T]``,
    the rotated K and V of token ``t`` are also written to flat slot ``slot_mapping[t]``
    (slot -1 is skipped), as the attention backend's store would.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if q.stride(1) != head_dim or k.stride(1) != head_dim or q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("q and k must hold each token's heads contiguously")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("q_norm_weight and k_norm_weight go together")
    store = (v, kv_cache, slot_mapping)
    if any(x is None for x in store) != all(x is None for x in store):
        raise ValueError("v, kv_cache and slot_mapping go together")
    store_kv = kv_cache is not None
    if store_kv and (v.shape != k.shape or v.stride(1) != head_dim or v.stride(2) != 1):
        raise ValueError(f"v must be shaped like k {tuple(k.shape)} with each token's heads contiguous")
    if store_kv and (tuple(kv_cache.shape[-2:]) != (num_kv_heads, head_dim) or not kv_cache.is_contiguous()):
        raise ValueError(f"kv_cache must be a contiguous [2, blocks, block_size, {num_kv_heads}, {head_dim}] tensor")
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
        v if store_kv else k,
        kv_cache if store_kv else k,
        slot_mapping if store_kv else positions,
        q.stride(0),
        k.stride(0),
        v.stride(0) if store_kv else 0,
        kv_cache.stride(0) if store_kv else 0,
        eps,
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        HAS_NORM=has_norm,
        STORE_KV=store_kv,
        num_warps=4,
    )
