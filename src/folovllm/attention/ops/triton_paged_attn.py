"""PagedAttention in Triton: the kernels only (launch planning lives in ``paged_attn.py``).

* ``_store_kv_kernel`` writes each new token's K and V into its cache slot.
* ``_paged_attention_kernel`` attends every query of a ragged batch (decode rows,
  prefills, chunked prefills alike) over its sequence's cached context. It reads
  K/V pages through the block table inside the loop, so no gathered copy of the
  cache is ever made, and keeps an online softmax (running max and sum in fp32).
  With split-K ("flash-decoding"), when a few long sequences cannot fill the
  GPU, each (sequence, KV head) is cut into context slices attended by separate
  programs, and the last of them to finish merges the partial results.

Nothing here reads a tensor on the host: every length comes from device memory,
so a launch can be captured in a CUDA graph and replayed with new lengths.
"""

from __future__ import annotations

import triton
import triton.language as tl

from folovllm.triton_utils.pdl import launch_dependents


@triton.jit
def _store_kv_kernel(
    K,
    V,
    KV_cache,
    slot_mapping,
    kv_stride,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
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


@triton.jit(do_not_specialize=["num_seqs", "min_split"])  # one compilation for any batch size and slice floor
def _paged_attention_kernel(
    Q,
    KV_cache,
    Out,
    Acc_part,
    M_part,
    L_part,
    Counters,
    block_table,
    seq_lens,
    query_start_loc,
    scale_log2,
    num_seqs,
    min_split,
    kv_stride,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    Q_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SEARCH: tl.constexpr,
    PDL: tl.constexpr,
):
    """Attention of ``Q_TILE`` query tokens x the ``GROUP`` query heads of one KV head.

    Grid ``(num_q_programs, num_kv_heads, NUM_SPLITS)``. Without ``SEARCH`` every
    query fits one tile and program ``i`` is sequence ``i`` (decode). With it, the
    tiles of sequence ``s`` are programs ``query_start_loc[s] // Q_TILE + s`` on,
    so ``T // Q_TILE + num_seqs`` programs cover any ragged batch of ``T`` tokens
    whatever its lengths, and a program finds its sequence by binary search. Row ``r`` of the
    ``[BLOCK_M, D]`` query tile is token ``r // GROUP_PAD``, head ``r % GROUP_PAD``
    of the group, so each K/V tile is loaded once and shared by all query heads
    of its KV head (GQA) through ``tl.dot``. A KV tile covers ``BLOCK_N`` context
    positions; position ``n`` lives in page ``block_table[seq, n // BLOCK_SIZE]``
    of the contiguous cache, V ``kv_stride`` elements after K.
    """
    launch_dependents(PDL)  # ``o_proj`` may start streaming its weights
    # region who am I
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if SEARCH:
        # the last sequence whose first tile is at or before pid
        lo = 0
        hi = num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            if tl.load(query_start_loc + mid) // Q_TILE + mid <= pid:
                lo = mid + 1
            else:
                hi = mid
        seq = lo - 1
        q_start = tl.load(query_start_loc + seq)
        tile = pid - (q_start // Q_TILE + seq)
    else:
        seq = pid
        tile = 0
        q_start = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_start
    if tile * Q_TILE >= q_len:  # a spare program: its sequence has no tile here
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
    q = tl.load(
        Q + tok64[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    # endregion

    # region loop over the context
    # Causality bounds the loop: nothing past the tile's last query position is read.
    kv_end = first_pos + tl.minimum((tile + 1) * Q_TILE, q_len)
    # Each sequence cuts its own context into NUM_SPLITS slices of whole KV tiles, from its own
    # length on the device, so a launch never depends on this step's lengths (CUDA-graph safe).
    # No slice is shorter than min_split (a multiple of BLOCK_N), so a short context (a fresh chunk, a
    # new decode) is one slice: its program stores the output itself and the other splits exit at once.
    split_len = tl.maximum(tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N, min_split)
    one_slice = split_len >= kv_end
    if NUM_SPLITS > 1:
        if one_slice & (split > 0):
            return
    lo = split * split_len
    hi = tl.minimum(kv_end, lo + split_len)
    # region online softmax
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
    # endregion
    # endregion

    # region epilogue
    out_ptrs = Out + tok64[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    out_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        direct = True
    else:
        direct = one_slice  # the whole causal context was this program's slice: nothing to merge
    if direct:
        tl.store(out_ptrs, (acc / tl.where(l_i > 0, l_i, 1.0)[:, None]).to(Out.dtype.element_ty), mask=out_mask)
    else:
        # Flash-decoding's merge, in this launch: every split writes its partial (running max, sum and
        # unnormalized output), and the last split of this (query tile, KV head) to arrive rescales all of
        # them to the global max, in split order, and stores the output; it then resets the counter for the
        # next launch (CUDA-graph replay), as the split-K GEMMs do (``split_k.py``).
        part = (tok64 * (GROUP * NUM_KV_HEADS) + head) * NUM_SPLITS
        tl.store(M_part + part + split, m_i, mask=row_ok)
        tl.store(L_part + part + split, l_i, mask=row_ok)
        saw = row_ok & (l_i > 0)  # a row that saw no key in this slice leaves its accumulator unwritten
        tl.store(Acc_part + (part + split)[:, None] * BLOCK_D + d[None, :], acc, mask=saw[:, None])
        tl.debug_barrier()  # this program's partial is written before its arrival is counted
        counter = Counters + pid * NUM_KV_HEADS + kv_head
        if tl.atomic_add(counter, 1, sem="acq_rel") == NUM_SPLITS - 1:
            m_max = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
            for other in tl.static_range(NUM_SPLITS):
                m_max = tl.maximum(m_max, tl.load(M_part + part + other, mask=row_ok, other=-1.0e30))
            total = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            denom = tl.zeros([BLOCK_M], dtype=tl.float32)
            for other in tl.static_range(NUM_SPLITS):  # a split that saw no key has m = -1e30, l = 0: weight 0
                w = tl.exp2(tl.load(M_part + part + other, mask=row_ok, other=-1.0e30) - m_max)
                l_other = tl.load(L_part + part + other, mask=row_ok, other=0.0)
                denom += l_other * w
                part_acc = tl.load(
                    Acc_part + (part + other)[:, None] * BLOCK_D + d[None, :],
                    mask=(row_ok & (l_other > 0))[:, None],
                    other=0.0,
                )
                total += part_acc * w[:, None]
            tl.atomic_xchg(counter, 0)
            tl.store(out_ptrs, (total / tl.where(denom > 0, denom, 1.0)[:, None]).to(Out.dtype.element_ty), mask=out_mask)
    # endregion
