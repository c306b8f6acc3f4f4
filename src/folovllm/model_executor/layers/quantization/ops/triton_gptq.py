"""The W4A16 GPTQ matmul in Triton: the kernels and the sizes of their block layout (packing, planning and launch live
in ``gptq_gemm.py``).

``Out [M, N] = X [M, K] @ W [K, N] (+ bias)`` where ``W`` exists only as packed codes: each program
loads a tile of 32-bit words, shifts and masks them into floats in registers (``_codes_as_floats``), and feeds them to
``tl.dot``. No dequantized copy of the weight is ever written, so a decode step reads
``bits / 16`` of the bytes a bf16 matmul reads.

Scales and zero points are applied in one of two places. Prefill (many rows of X) is bound by the
tensor cores: each 16-row slice of codes is dequantized, ``s (q - z)``, and multiplied in.
Decode (a few rows) is bound by the weight stream, and per-weight arithmetic would slow it: for the
rows of one group, ``Σ_k x_k s (q_k - z) = s (Σ_k x_k q_k - z Σ_k x_k)``, so the inner loop only
converts codes and ``s`` and ``z`` touch a ``[BLOCK_M, BLOCK_N]`` tile once per group.

Decode (few rows of X) is bound by the weight bytes: the planner then splits K across programs
(split-K, ``layers/ops/split_k.py``) so every SM streams weights. With bf16 activations the decode
tiles can also make their operands in bf16 directly, two codes per word operation, with the zero point
subtracted before the product (``_gptq_gemm_pairs_kernel``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from folovllm.model_executor.layers.ops.split_k import store_tile

SLICE_ROWS = 16  # K of one tl.dot: rows of X per slice
PER_CHANNEL = 2**30  # the group size the kernels see for group_size=-1: one group longer than any K


def block_rows(bits: int) -> int:
    """Input rows per block of 16 words: ``16 * 32 / bits``."""
    return SLICE_ROWS * (32 // bits)


@triton.jit
def _x_slice(x_rows, Perm, k, K, m_ok, HAS_PERM: tl.constexpr):
    """The ``[BLOCK_M, len(k)]`` slice of X that weight rows ``k`` multiply (with act-order, the columns
    ``Perm`` names); zero past ``K``."""
    k_ok = k < K
    if HAS_PERM:
        k_x = tl.load(Perm + k, mask=k_ok, other=0)
    else:
        k_x = k
    return tl.load(x_rows + k_x[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)


@triton.jit
def _codes_as_floats(words, J: tl.constexpr, BITS: tl.constexpr):
    """Bit field ``J`` of each word as the fp32 ``1 + q / 2^BITS``: the field moved to the top of the
    mantissa of 1.0 and reinterpreted. A shift and one AND-OR (a single LOP3) per weight, where
    ``(words >> J*BITS) & MAXQ`` then a conversion to float costs a shift, an AND and a slow I2F
    (or an OR and a subtract for the 2^23 trick). Callers undo the affine map once per group:
    ``q = 2^BITS (v - 1)``."""
    SHIFT: tl.constexpr = 23 - BITS - J * BITS
    if SHIFT >= 0:
        moved = words << SHIFT
    else:
        moved = words >> -SHIFT
    return ((moved & (((1 << BITS) - 1) << (23 - BITS))) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _group_scale_zero(Scales, Zeros, row, last_group, N, rn, n_ok, GROUP_SIZE: tl.constexpr):
    """Scale and zero point (fp32) of the group holding weight row ``row``, for columns ``rn``. Rows
    padded past K read the last group's (unused) values."""
    g = tl.minimum(row // GROUP_SIZE, last_group)
    s = tl.load(Scales + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)
    z = tl.load(Zeros + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)
    return s, z


@triton.jit
def _gptq_gemm_kernel(
    X,
    QWeight,
    Scales,
    Zeros,
    Perm,
    Bias,
    Out,
    Partials,
    Counters,
    M,
    N,
    K,
    stride_xm,
    blocks_per_split,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    SLICES_PER_GROUP: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DEQUANT_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` output tile over one K range; grid ``(M tiles, N tiles, SPLIT_K)``.

    Word row ``16 b + t`` of ``QWeight [K_blocks * 16, N]`` holds, in bit field ``j``, the code of
    input row ``BLOCK_K b + 16 j + t`` (``BLOCK_K = 16 * 32 / BITS``): one ``[16, BLOCK_N]`` load of
    words gives ``32 / BITS`` slices of 16 consecutive rows, each one ``tl.dot`` operand after a
    shift and a mask. A group spans ``SLICES_PER_GROUP`` slices. ``Perm`` (act-order) says which
    column of X each weight row multiplies.
    """
    PACK: tl.constexpr = 32 // BITS
    OFFSET: tl.constexpr = (1 << BITS) if BITS < 8 else 0  # the 2^BITS (v - 1) = q form's constant term
    ROWS: tl.constexpr = 16
    BLOCK_K: tl.constexpr = ROWS * PACK
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    t = tl.arange(0, ROWS)
    x_rows = X + rm.to(tl.int64)[:, None] * stride_xm
    last_group = (K - 1) // GROUP_SIZE
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = split * blocks_per_split
    for blk in range(first, tl.minimum(first + blocks_per_split, tl.cdiv(K, BLOCK_K))):
        words = tl.load(QWeight + (blk * ROWS + t)[:, None] * N + rn[None, :], mask=n_ok[None, :], other=0)
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for j in tl.static_range(PACK):  # unrolled: every `if` on j below is decided at compile time
            x = _x_slice(x_rows, Perm, blk * BLOCK_K + j * ROWS + t, K, m_ok, HAS_PERM)
            v = _codes_as_floats(words, j, BITS)
            if BITS >= 8:  # 1 + q/256 needs 9 significant bits, bf16 holds 8; q/256 fits
                v = v - 1.0
            if j % SLICES_PER_GROUP == 0:  # a group starts at this slice
                s, z = _group_scale_zero(Scales, Zeros, blk * BLOCK_K + j * ROWS, last_group, N, rn, n_ok, GROUP_SIZE)
                s_v = s * (1 << BITS)  # s (q - z) = s_v v - s_0
                s_0 = s * (OFFSET + z)
            if DEQUANT_TILES:
                w = v * s_v[None, :] - s_0[None, :]
                acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
            else:
                part = tl.dot(x, v.to(x.dtype), part, input_precision=DOT_PRECISION)
                x_sum += tl.sum(x.to(tl.float32), axis=1)
                if (j + 1) % SLICES_PER_GROUP == 0:  # the group's last slice
                    acc += part * s_v[None, :] - x_sum[:, None] * s_0[None, :]
                    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                    x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)

    store_tile(acc, Out, Bias, Partials, Counters, rm, rn, m_ok, n_ok, M, N, split, HAS_BIAS, SPLIT_K)


@triton.jit
def _gptq_gemm_block_kernel(
    X,
    QWeight,
    Scales,
    Zeros,
    Perm,
    Bias,
    Out,
    Partials,
    Counters,
    M,
    N,
    K,
    stride_xm,
    blocks_per_split,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    SLICES_PER_GROUP: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Prefill: dequantize a whole block of ``16 * 32 / BITS`` input rows, then one ``tl.dot`` over all of it.

    With many rows of X the tensor cores set the pace, and ``_gptq_gemm_kernel``'s dequantized-tile
    branch feeds them one 16-deep slice at a time: on an H200 every slice is stored to shared memory
    (Hopper's ``wgmma`` reads its second operand there) and waited for before its own small MMA, and
    the kernel ran at 0.18-0.31x cuBLAS's speed at M = 256 (104-220 against 505-706 TFLOP/s). Here
    the block's bit fields are unpacked at once into a ``[PACK, 16, BLOCK_N]`` tensor (field ``j``
    holds rows ``16 j + t``, so a reshape gives the ``[BLOCK_K, BLOCK_N]`` tile in input-row order),
    dequantized with one scale and zero point per slice (a group holds whole slices), and multiplied
    in one deep product: one trip through shared memory per block instead of eight, and the MMAs of
    a block back to back.
    """
    PACK: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    ROWS: tl.constexpr = 16
    BLOCK_K: tl.constexpr = ROWS * PACK
    split = tl.program_id(2)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    t = tl.arange(0, ROWS)
    fields = tl.arange(0, PACK)
    x_rows = X + rm.to(tl.int64)[:, None] * stride_xm
    last_group = (K - 1) // GROUP_SIZE
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = split * blocks_per_split
    for blk in range(first, tl.minimum(first + blocks_per_split, tl.cdiv(K, BLOCK_K))):
        words = tl.load(QWeight + (blk * ROWS + t)[:, None] * N + rn[None, :], mask=n_ok[None, :], other=0)
        codes = (words[None, :, :] >> (fields * BITS)[:, None, None]) & MAXQ  # [PACK, 16, BLOCK_N]
        groups = tl.minimum((blk * BLOCK_K + fields * ROWS) // GROUP_SIZE, last_group)  # one per slice
        s = tl.load(Scales + groups[:, None] * N + rn[None, :], mask=n_ok[None, :], other=0.0).to(tl.float32)
        z = tl.load(Zeros + groups[:, None] * N + rn[None, :], mask=n_ok[None, :], other=0.0).to(tl.float32)
        w = (codes.to(tl.float32) - z[:, None, :]) * s[:, None, :]
        x = _x_slice(x_rows, Perm, blk * BLOCK_K + tl.arange(0, BLOCK_K), K, m_ok, HAS_PERM)
        acc = tl.dot(x, tl.reshape(w, (BLOCK_K, BLOCK_N)).to(x.dtype), acc, input_precision=DOT_PRECISION)
    store_tile(acc, Out, Bias, Partials, Counters, rm, rn, m_ok, n_ok, M, N, split, HAS_BIAS, SPLIT_K)


@triton.jit
def _gptq_gemm_swap_ab_kernel(
    X,
    QWeight,
    Scales,
    Zeros,
    Perm,
    Bias,
    Out,
    Partials,
    Counters,
    M,
    N,
    K,
    stride_xm,
    blocks_per_split,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    SLICES_PER_GROUP: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Decode with the operands swapped: ``Out^T [BLOCK_N, BLOCK_M] = W^T X^T``, one output tile, one K range.

    In ``_gptq_gemm_kernel`` the few rows of X are the MMA's first operand and the codes its second:
    compiled for an H100/H200, that is ``mma.sync`` with every 16x16 slice of X moved between register
    layouts through shared memory (46 barriers for a 128-column tile). Swapped, the codes of a
    ``[BLOCK_N, 16]`` slice are the first operand, which Hopper's warpgroup MMA (``wgmma``) reads from
    registers, where the shift and AND-OR just made them; X becomes the small second operand that
    ``wgmma`` reads from shared memory, and Triton streams it there asynchronously, several slices ahead
    (12 barriers). The arithmetic per group is the decode branch's, transposed. ``BLOCK_N`` must be a
    multiple of 64 per warpgroup (4 warps) for ``wgmma``; elsewhere it compiles to ``mma.sync``.
    """
    PACK: tl.constexpr = 32 // BITS
    OFFSET: tl.constexpr = (1 << BITS) if BITS < 8 else 0
    ROWS: tl.constexpr = 16
    BLOCK_K: tl.constexpr = ROWS * PACK
    split = tl.program_id(2)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    t = tl.arange(0, ROWS)
    x_rows = X + rm.to(tl.int64)[:, None] * stride_xm
    last_group = (K - 1) // GROUP_SIZE
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    first = split * blocks_per_split
    for blk in range(first, tl.minimum(first + blocks_per_split, tl.cdiv(K, BLOCK_K))):
        words = tl.load(QWeight + (blk * ROWS + t)[None, :] * N + rn[:, None], mask=n_ok[:, None], other=0)
        part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for j in tl.static_range(PACK):
            x_t = tl.trans(_x_slice(x_rows, Perm, blk * BLOCK_K + j * ROWS + t, K, m_ok, HAS_PERM))
            v = _codes_as_floats(words, j, BITS)
            if BITS >= 8:
                v = v - 1.0
            if j % SLICES_PER_GROUP == 0:
                s, z = _group_scale_zero(Scales, Zeros, blk * BLOCK_K + j * ROWS, last_group, N, rn, n_ok, GROUP_SIZE)
                s_v = s * (1 << BITS)
                s_0 = s * (OFFSET + z)
            part = tl.dot(v.to(x_t.dtype), x_t, part, input_precision=DOT_PRECISION)
            x_sum += tl.sum(x_t.to(tl.float32), axis=0)
            if (j + 1) % SLICES_PER_GROUP == 0:
                acc += part * s_v[:, None] - s_0[:, None] * x_sum[None, :]
                part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    store_tile(tl.trans(acc), Out, Bias, Partials, Counters, rm, rn, m_ok, n_ok, M, N, split, HAS_BIAS, SPLIT_K)


@triton.jit
def _gptq_gemv_kernel(
    X,
    QWeight,
    Scales,
    Zeros,
    Perm,
    Bias,
    Out,
    Partials,
    Counters,
    M,
    N,
    K,
    stride_xm,
    blocks_per_split,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    SLICES_PER_GROUP: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Decode without ``tl.dot``: one row of X (``BLOCK_M`` = 1) against ``BLOCK_N`` columns over one K range.

    A tensor-core tile would pad one row of X to 16; here each code is used where it sits, with plain
    fused multiply-adds into a ``[16, BLOCK_N]`` accumulator laid out like the ``[16, BLOCK_N]`` tile of
    words, reduced over its 16 rows once, at the end. (A ``[BLOCK_M, 16, BLOCK_N]`` accumulator for
    several rows of X took another layout than the words, and Triton moved every slice of codes between
    the two through shared memory, with barriers: that, not the arithmetic, set this kernel's pace.)
    Per weight: a shift and an AND-OR (``_codes_as_floats``) and one FMA; scales and zero points touch
    the accumulator once per group, as in the decode branch above.
    """
    tl.static_assert(BLOCK_M == 1, "the GEMV computes one row of X per program")
    PACK: tl.constexpr = 32 // BITS
    ROWS: tl.constexpr = 16
    BLOCK_K: tl.constexpr = ROWS * PACK
    split = tl.program_id(2)
    row = tl.program_id(0)
    rm = row + tl.arange(0, 1)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    t = tl.arange(0, ROWS)
    x_row = X + row.to(tl.int64) * stride_xm
    last_group = (K - 1) // GROUP_SIZE
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(K, BLOCK_K))
    word_rows = QWeight + (first * ROWS + t)[:, None] * N + rn[None, :]
    upcoming = tl.load(word_rows, mask=n_ok[None, :] & (first < last), other=0)
    for blk in range(first, last):
        # The next block's words are requested before this one's arithmetic, so one load is always in
        # flight behind the math (Triton pipelines loads that feed tl.dot, not these). Two or three blocks
        # ahead were slower on every H200 shape (M7.md, 2026-12-02).
        words = upcoming
        upcoming = tl.load(word_rows + (blk + 1 - first) * ROWS * N, mask=n_ok[None, :] & (blk + 1 < last), other=0)
        part = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        x_sum = tl.zeros((ROWS,), dtype=tl.float32)
        for j in tl.static_range(PACK):
            k = blk * BLOCK_K + j * ROWS + t
            k_x = tl.load(Perm + k, mask=k < K, other=0) if HAS_PERM else k
            x = tl.load(x_row + k_x, mask=k < K, other=0.0).to(tl.float32)
            v = _codes_as_floats(words, j, BITS)
            if j % SLICES_PER_GROUP == 0:
                s, z = _group_scale_zero(Scales, Zeros, blk * BLOCK_K + j * ROWS, last_group, N, rn, n_ok, GROUP_SIZE)
                s_v = s * (1 << BITS)
                s_0 = s * ((1 << BITS) + z)
            part += v * x[:, None]
            x_sum += x
            if (j + 1) % SLICES_PER_GROUP == 0:
                acc += part * s_v[None, :] - x_sum[:, None] * s_0[None, :]
                part = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
                x_sum = tl.zeros((ROWS,), dtype=tl.float32)
    out = tl.sum(acc, axis=0)[None, :]
    store_tile(out, Out, Bias, Partials, Counters, rm, rn, rm < M, n_ok, M, N, split, HAS_BIAS, SPLIT_K)


@triton.jit
def _code_pairs(words, J: tl.constexpr, BITS: tl.constexpr):
    """Bit fields ``J`` and ``J + 16 / BITS`` of each word as bf16 ``128 + q``, two codes per shift and AND-OR."""
    MASK: tl.constexpr = ((1 << BITS) - 1) * 0x10001
    pair = ((words >> (J * BITS)) & MASK) | 0x43004300
    lo = pair.to(tl.int16).to(tl.bfloat16, bitcast=True)
    hi = (pair >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return lo, hi


@triton.jit
def _gptq_gemm_pairs_kernel(
    X,
    QWeight,
    Scales,
    Zeros,
    Perm,
    Bias,
    Out,
    Partials,
    Counters,
    M,
    N,
    K,
    stride_xm,
    blocks_per_split,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    SLICES_PER_GROUP: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """``_gptq_gemm_swap_ab_kernel`` with the codes made bf16 two at a time and the zero point taken off in bf16.

    Compiled for an H200, the swapped kernel's K loop spent about nine instructions per weight: a shift and an
    AND-OR per code for the fp32 ``1 + q/16``, a conversion per pair to bf16, and, for the zero-point term, a
    sum of every 16-row slice of X across lanes (shuffles and adds). Here one shift and one AND-OR make two
    codes, fields ``j`` and ``j + 16/BITS`` of a word, as bf16 ``128 + q`` (the code under a bf16 exponent of
    2^7, whose mantissa step is 1); ``sub.bf16x2`` takes ``128 + z`` off two at a time, exactly, since
    ``q - z`` is a small integer; and the tensor cores get ``q - z`` itself, so a group needs only its scale,
    applied to the product once. About five instructions per weight are left (loads and addresses among
    them). Weights of 2 or 4 bits with bf16 activations only: ``128 + q`` is exact below q = 128.
    Each slice pair still waits for its product. Joining a block's codes into one operand (one wait per block,
    ~3.9 instructions per weight, the zero point off the product with one sum of X) was slower against bf16 on
    every projection and M on the H200 (M7.md, 2026-12-03); its loop held more barriers (7 against 4).
    """
    PACK: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = PACK // 2
    ONE_GROUP: tl.constexpr = SLICES_PER_GROUP >= PACK
    ROWS: tl.constexpr = 16
    BLOCK_K: tl.constexpr = ROWS * PACK
    split = tl.program_id(2)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    t = tl.arange(0, ROWS)
    x_rows = X + rm.to(tl.int64)[:, None] * stride_xm
    last_group = (K - 1) // GROUP_SIZE
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    first = split * blocks_per_split
    if ONE_GROUP:
        s_next, z_next = _group_scale_zero(Scales, Zeros, first * BLOCK_K, last_group, N, rn, n_ok, GROUP_SIZE)
    for blk in range(first, tl.minimum(first + blocks_per_split, tl.cdiv(K, BLOCK_K))):
        words = tl.load(QWeight + (blk * ROWS + t)[None, :] * N + rn[:, None], mask=n_ok[:, None], other=0)
        base = blk * BLOCK_K
        if ONE_GROUP:
            # The next block's scale and zero point are requested a block ahead: the zero point is needed
            # before the first product, and a load issued here would stall every block for a trip to HBM.
            s, z = s_next, z_next
            s_next, z_next = _group_scale_zero(Scales, Zeros, base + BLOCK_K, last_group, N, rn, n_ok, GROUP_SIZE)
            off = (128 + z).to(tl.bfloat16)[:, None]
            part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for j in tl.static_range(HALF):
            lo, hi = _code_pairs(words, j, BITS)
            x_lo = tl.trans(_x_slice(x_rows, Perm, base + j * ROWS + t, K, m_ok, HAS_PERM))
            x_hi = tl.trans(_x_slice(x_rows, Perm, base + (j + HALF) * ROWS + t, K, m_ok, HAS_PERM))
            if ONE_GROUP:
                part = tl.dot(lo - off, x_lo, part)
                part = tl.dot(hi - off, x_hi, part)
            else:
                if j % SLICES_PER_GROUP == 0:
                    s_lo, z_lo = _group_scale_zero(Scales, Zeros, base + j * ROWS, last_group, N, rn, n_ok, GROUP_SIZE)
                    s_hi, z_hi = _group_scale_zero(Scales, Zeros, base + (j + HALF) * ROWS, last_group, N, rn, n_ok,
                                                   GROUP_SIZE)  # fmt: skip
                    off_lo = (128 + z_lo).to(tl.bfloat16)[:, None]
                    off_hi = (128 + z_hi).to(tl.bfloat16)[:, None]
                    part_lo = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                    part_hi = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                part_lo = tl.dot(lo - off_lo, x_lo, part_lo)
                part_hi = tl.dot(hi - off_hi, x_hi, part_hi)
                if (j + 1) % SLICES_PER_GROUP == 0:
                    acc += part_lo * s_lo[:, None] + part_hi * s_hi[:, None]
        if ONE_GROUP:
            acc += part * s[:, None]
    store_tile(tl.trans(acc), Out, Bias, Partials, Counters, rm, rn, m_ok, n_ok, M, N, split, HAS_BIAS, SPLIT_K)
