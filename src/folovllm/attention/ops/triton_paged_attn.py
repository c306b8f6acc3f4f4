"""Triton kernels for the paged KV cache: store the step's K/V, then attend through the block table.

Three kernels, one family:

* ``_store_kv_kernel`` writes each new token's K and V into its cache slot.
* ``_paged_attention_kernel`` attends every query of a ragged batch (decode rows,
  prefills, chunked prefills alike) over its sequence's cached context. It reads
  K/V pages through the block table inside the loop, so no gathered copy of the
  cache is ever made, and keeps an online softmax (running max and sum in fp32).
* ``_reduce_splits_kernel`` merges the partial results of split-K
  ("flash-decoding"): when a few long sequences cannot fill the GPU, each
  (sequence, KV head) is cut into context slices attended by separate programs.

CPU tensors run the same kernels under Triton's interpreter (numpy, slow), so
the backend is testable without a GPU. ``TRITON_INTERPRET=1`` would do that
too, but Triton reads it when ``@triton.jit`` decorates a function, i.e. at its
first import, which ``transformers`` often does before us; so CPU launches
switch to the interpreter per call instead (see ``_Interpreted``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from folovllm.attention.backends.abstract import AttentionMetadata

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634
_MIN_SPLIT_TOKENS = 512  # shorter split-K slices save less GPU time than the merge launch costs


@triton.jit
def _store_kv_kernel(K, V, KV_cache, slot_mapping, kv_stride,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per token: copy its ``[Hkv, D]`` K and V rows into flat slot ``slot_mapping[t]``.

    The cache is contiguous, so slot ``s`` starts at ``s * Hkv * D``; V sits ``kv_stride`` after K.
    """
    t = tl.program_id(0)
    slot = tl.load(slot_mapping + t)
    if slot < 0:  # padding token: nothing to store
        return
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    t64 = t.to(tl.int64)
    dst = KV_cache + slot * (NUM_KV_HEADS * HEAD_DIM) + h * HEAD_DIM + d
    k = tl.load(K + t64 * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(V + t64 * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(dst, k, mask=mask)
    tl.store(dst + kv_stride, v, mask=mask)


@triton.jit
def _paged_attention_kernel(
        Q, KV_cache, Out, Acc_part, M_part, L_part,
        block_table, seq_lens, query_start_loc,
        scale_log2, num_q_tiles, split_len, kv_stride,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
        NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, Q_TILE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """Attention of ``Q_TILE`` query tokens x the ``GROUP`` query heads of one KV head.

    Grid ``(num_seqs * num_q_tiles, num_kv_heads, NUM_SPLITS)``. Row ``r`` of the
    ``[BLOCK_M, D]`` query tile is token ``r // GROUP_PAD``, head ``r % GROUP_PAD``
    of the group, so each K/V tile is loaded once and shared by all query heads
    of its KV head (GQA) through ``tl.dot``. A KV tile covers ``BLOCK_N`` context
    positions; position ``n`` lives in page ``block_table[seq, n // BLOCK_SIZE]``
    of the contiguous cache, V ``kv_stride`` elements after K.
    """
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = pid // num_q_tiles
    tile = pid % num_q_tiles
    q_start = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_start
    if tile * Q_TILE >= q_len:  # this sequence has fewer query tiles than the longest one
        return
    seq_len = tl.load(seq_lens + seq)
    first_pos = seq_len - q_len  # context position of the sequence's first query

    rows = tl.arange(0, BLOCK_M)
    tok = tile * Q_TILE + rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (tok < q_len) & (rows % GROUP_PAD < GROUP)
    q_pos = first_pos + tok  # padding rows get positions >= seq_len and stay finite
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    tok64 = (q_start + tok).to(tl.int64)
    q = tl.load(Q + tok64[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Causality bounds the loop: nothing past the tile's last query position is read.
    kv_end = first_pos + tl.minimum((tile + 1) * Q_TILE, q_len)
    lo = split * split_len
    hi = tl.minimum(kv_end, lo + split_len)
    # Running max (log2 units, as the scores) starts finite: a row that has seen no
    # visible key yet then gets exp2(-inf - m) = 0 instead of NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table_row = block_table + seq * stride_bt
    slot_size: tl.constexpr = NUM_KV_HEADS * HEAD_DIM
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        page = tl.load(table_row + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        slot = (page * BLOCK_SIZE + n % BLOCK_SIZE) * slot_size + kv_head * HEAD_DIM
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(KV_cache + slot[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where((n[None, :] <= q_pos[:, None]) & n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(KV_cache + kv_stride + slot[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(Out + tok64[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        part = (tok64 * (GROUP * NUM_KV_HEADS) + head) * NUM_SPLITS + split
        tl.store(M_part + part, m_i, mask=row_ok)
        tl.store(L_part + part, l_i, mask=row_ok)
        tl.store(Acc_part + part[:, None] * BLOCK_D + d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _reduce_splits_kernel(Out, Acc_part, M_part, L_part, stride_ot, stride_oh,
                          NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                          BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One program per (token, query head): rescale each split to the global max and sum."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, BLOCK_D)
    part = (t.to(tl.int64) * tl.num_programs(1) + h) * NUM_SPLITS + s
    s_ok = s < NUM_SPLITS
    m = tl.load(M_part + part, mask=s_ok, other=-1.0e30)
    l = tl.load(L_part + part, mask=s_ok, other=0.0)
    acc = tl.load(Acc_part + part[:, None] * BLOCK_D + d[None, :], mask=s_ok[:, None], other=0.0)
    w = tl.exp2(m - tl.max(m, 0))
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(Out + t.to(tl.int64) * stride_ot + h * stride_oh + d,
             out.to(Out.dtype.element_ty), mask=d < HEAD_DIM)


def _check_inputs(kv_cache: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Kernels index the cache as contiguous and load every operand in the cache's dtype."""
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got shape {tuple(kv_cache.shape)}")
    if kv_cache.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"kv_cache dtype must be float32, float16 or bfloat16, got {kv_cache.dtype}")
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")
    head_dim = kv_cache.shape[4]
    for name, x in tensors.items():
        if x.dim() != 3 or x.shape[2] != head_dim or x.stride(2) != 1:
            raise ValueError(f"{name} must be [T, heads, {head_dim}] with a contiguous last dim, "
                             f"got shape {tuple(x.shape)} strides {x.stride()}")
        if x.dtype != kv_cache.dtype:
            raise ValueError(f"{name} dtype {x.dtype} must match the kv_cache dtype {kv_cache.dtype}")
        if x.device != kv_cache.device:
            raise ValueError(f"{name} is on {x.device} but kv_cache is on {kv_cache.device}")


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write ``k, v [T, Hkv, D]`` into flat slots ``slot_mapping [T]`` of ``kv_cache``; slot -1 is skipped."""
    _check_inputs(kv_cache, k=k, v=v)
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    if k.shape != v.shape or k.shape[1] != num_kv_heads:
        raise ValueError(f"k and v must both be [T, {num_kv_heads}, {head_dim}], "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must have shape ({k.shape[0]},), got {tuple(slot_mapping.shape)}")
    if k.shape[0] == 0:
        return
    _for_device(_store_kv_kernel, k.device)[(k.shape[0],)](
        k, v, kv_cache, slot_mapping, kv_cache.stride(0),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim))


def _tile_config(group_pad: int, block_d: int, max_query_len: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)``, from a sweep on an H200 (bf16).

    Decode rows only need ``GROUP`` query rows, but ``tl.dot`` wants at least 16;
    prefill tiles take 64 rows so each K/V tile feeds more math.
    """
    block_n = 64 if block_d <= 128 else 32
    if max_query_len == 1:
        return max(16, group_pad), block_n, 4, 3
    return max(64, group_pad), block_n, 4 if block_d <= 128 else 8, 2


@cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(device: torch.device, num_seqs: int, num_kv_heads: int,
                      max_query_len: int, max_seq_len: int) -> int:
    """Split-K slices per context: >1 only for decode batches too small to fill the GPU's SMs twice over.

    A power of two (each value compiles its own kernel), at most 16, and no
    slice shorter than ``_MIN_SPLIT_TOKENS``.
    """
    if device.type != "cuda" or max_query_len != 1:
        return 1
    by_occupancy = triton.cdiv(2 * _num_sms(device), num_seqs * num_kv_heads)
    by_length = max_seq_len // _MIN_SPLIT_TOKENS
    return max(1, min(16, triton.next_power_of_2(min(by_occupancy, by_length) + 1) // 2))


@dataclass(frozen=True)
class _LaunchPlan:
    """Grid and tile sizes of one step; every layer reuses it (kept in ``metadata.backend_cache``)."""

    grid: tuple[int, int, int]
    group: int
    group_pad: int
    q_tile: int
    num_q_tiles: int
    block_m: int
    block_n: int
    block_d: int
    num_splits: int
    split_len: int
    num_warps: int
    num_stages: int


def _plan(metadata: AttentionMetadata, num_heads: int, num_kv_heads: int, head_dim: int,
          block_size: int, device: torch.device, num_splits: int | None) -> _LaunchPlan:
    if metadata.block_table is None or metadata.block_table.stride(-1) != 1:
        raise ValueError("metadata.block_table must be a [B, max_blocks] tensor with contiguous rows")
    for name in ("block_table", "seq_lens", "query_start_loc"):
        if getattr(metadata, name).device != device:
            raise ValueError(f"metadata.{name} is on {getattr(metadata, name).device}, q on {device}")
    if metadata.block_size != block_size:
        raise ValueError(f"metadata.block_size ({metadata.block_size}) != kv_cache block size ({block_size})")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be a positive integer, got {num_splits}")
    max_query_len, max_seq_len = metadata.max_query_len, metadata.max_seq_len
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, num_warps, num_stages = _tile_config(group_pad, block_d, max_query_len)
    q_tile = block_m // group_pad
    num_q_tiles = triton.cdiv(max_query_len, q_tile)
    if num_splits is None:
        num_splits = choose_num_splits(device, metadata.num_seqs, num_kv_heads, max_query_len, max_seq_len)
    split_len = triton.cdiv(triton.cdiv(max_seq_len, num_splits), block_n) * block_n
    return _LaunchPlan((metadata.num_seqs * num_q_tiles, num_kv_heads, num_splits), group, group_pad,
                       q_tile, num_q_tiles, block_m, block_n, block_d, num_splits, split_len,
                       num_warps, num_stages)


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                    scale: float, num_splits: int | None = None) -> torch.Tensor:
    """Causal attention of ``q [T, Hq, D]`` over the paged cache -> ``[T, Hq, D]`` in q's dtype.

    Expects this step's K/V already stored. One launch serves the whole ragged
    batch. Grid ``(num_seqs * num_q_tiles, num_kv_heads, num_splits)``:

    * a program owns one KV head, so its K/V tiles are read from memory once
      for all ``Hq / Hkv`` query heads of that head (GQA costs no extra traffic);
    * ``num_q_tiles`` covers the longest query in the batch; shorter sequences
      exit at once from their surplus tiles (decode batches have exactly one);
    * ``num_splits`` cuts each context into slices merged by a second kernel,
      so a handful of long sequences still occupies every SM. ``None`` picks
      it (>1 only for decode batches too small to fill the GPU); an int forces it.
    """
    _check_inputs(kv_cache, q=q)
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    if num_heads % num_kv_heads:
        raise ValueError(f"q heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if num_tokens != metadata.num_tokens:
        raise ValueError(f"q has {num_tokens} tokens but metadata.query_lens_cpu sums to {metadata.num_tokens}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    key = ("triton_plan", num_heads, num_kv_heads, head_dim, block_size, num_splits)
    plan = metadata.backend_cache.get(key)
    if plan is None:
        plan = _plan(metadata, num_heads, num_kv_heads, head_dim, block_size, q.device, num_splits)
        metadata.backend_cache[key] = plan
    if plan.num_splits > 1:
        parts = num_tokens * num_heads * plan.num_splits
        acc_part = torch.empty(parts, plan.block_d, dtype=torch.float32, device=q.device)
        m_part = torch.empty(parts, dtype=torch.float32, device=q.device)
        l_part = torch.empty(parts, dtype=torch.float32, device=q.device)
    else:  # never touched: the kernel writes ``out`` directly
        acc_part = m_part = l_part = out
    _for_device(_paged_attention_kernel, q.device)[plan.grid](
        q, kv_cache, out, acc_part, m_part, l_part,
        metadata.block_table, metadata.seq_lens, metadata.query_start_loc,
        scale * _LOG2E, plan.num_q_tiles, plan.split_len, kv_cache.stride(0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), metadata.block_table.stride(0),
        NUM_KV_HEADS=num_kv_heads, GROUP=plan.group, GROUP_PAD=plan.group_pad, Q_TILE=plan.q_tile, BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n, BLOCK_D=plan.block_d, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        NUM_SPLITS=plan.num_splits, DOT_PRECISION="ieee" if kv_cache.dtype == torch.float32 else "tf32",
        num_warps=plan.num_warps, num_stages=plan.num_stages)
    if plan.num_splits > 1:
        _for_device(_reduce_splits_kernel, q.device)[(num_tokens, num_heads)](
            out, acc_part, m_part, l_part, out.stride(0), out.stride(1),
            NUM_SPLITS=plan.num_splits, SPLITS_PAD=max(2, triton.next_power_of_2(plan.num_splits)),
            BLOCK_D=plan.block_d, HEAD_DIM=head_dim)
    return out


# ---- CPU tensors: the same kernels under Triton's interpreter -------------------------

_ORIGINAL_PATCH_TENSOR = interpreter._patch_lang_tensor
_ORIGINAL_DOT = interpreter.InterpreterBuilder.create_dot
_LANGUAGE_NAMESPACES = (tl, tl.core, tl.math, tl.standard, tl.tensor, tl.dtype,
                        tl.core.tensor_descriptor_base)


@cache
def _interpreted(fn: Callable) -> InterpretedFunction:
    return InterpretedFunction(fn)


def _index_via_item(tensor: type, scope: object) -> None:
    """Triton 3.6 turns interpreter scalars into ints with ``int(array)``, which numpy >= 2.4
    refuses for its 1-element arrays (triton-lang/triton#9171); loops with runtime bounds need it."""
    _ORIGINAL_PATCH_TENSOR(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))


def _bf16_as_fp32(h: interpreter.TensorHandle) -> interpreter.TensorHandle:
    if h.dtype != tl.bfloat16:
        return h
    return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)


def _dot_bf16_as_fp32(self: interpreter.InterpreterBuilder, a: interpreter.TensorHandle,
                      b: interpreter.TensorHandle, *args) -> interpreter.TensorHandle:
    """The interpreter keeps bf16 as raw uint16 bits and its dot would multiply the bits."""
    return _ORIGINAL_DOT(self, _bf16_as_fp32(a), _bf16_as_fp32(b), *args)


@contextmanager
def _interpreting() -> Iterator[None]:
    """Let the interpreter run a kernel although Triton was imported for compiling.

    ``tl.max``, ``tl.sum``, ``tl.zeros``... are ``@triton.jit`` functions too;
    compiled ones cannot be called by the interpreter, so interpreted copies
    stand in. The interpreter also leaves some of its patches on
    ``triton.language`` behind, which would break later GPU compiles in this
    process, so every namespace it touches is restored afterwards (names it
    adds to modules stay: its rewritten functions look them up there).
    Not thread-safe: CPU launches are for tests and notebooks.
    """
    saved = [(ns, dict(vars(ns))) for ns in _LANGUAGE_NAMESPACES]
    for name, obj in saved[0][1].items():
        if isinstance(obj, JITFunction):
            setattr(tl, name, _interpreted(obj.fn))
    interpreter._patch_lang_tensor = _index_via_item
    interpreter.InterpreterBuilder.create_dot = _dot_bf16_as_fp32
    try:
        yield
    finally:
        interpreter._patch_lang_tensor = _ORIGINAL_PATCH_TENSOR
        interpreter.InterpreterBuilder.create_dot = _ORIGINAL_DOT
        for ns, before in saved:
            for name in set(vars(ns)) - set(before) if isinstance(ns, type) else ():
                delattr(ns, name)
            for name, value in before.items():
                if vars(ns).get(name) is not value:
                    setattr(ns, name, value)


class _Interpreted:
    """``kernel[grid](...)`` for CPU tensors: the same kernel body, run by Triton's interpreter."""

    def __init__(self, kernel: JITFunction | InterpretedFunction) -> None:
        self.fn = kernel if isinstance(kernel, InterpretedFunction) else _interpreted(kernel.fn)

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        def launch(*args, **kwargs) -> None:
            with _interpreting():
                self.fn[grid](*args, **kwargs)
        return launch


def _for_device(kernel: JITFunction | InterpretedFunction,
                device: torch.device) -> JITFunction | InterpretedFunction | _Interpreted:
    """The kernel as compiled for CUDA tensors; Triton's interpreter for CPU tensors."""
    return _Interpreted(kernel) if device.type == "cpu" else kernel
