"""The W4A16 decode matmul, warp-specialized (Gluon, Hopper): one warp only loads, four only convert and multiply.

The Triton decode kernels (``triton_gptq.py``) issue loads, convert codes, wait for products and wait for loads in
the same four warps, and on the H200 that structure, not the instruction count, kept them at 1.3-1.8x bf16 at one
row (``milestones/results/m7_decode_limits.py``). Here a loader warp streams each K block's words and X slices into
a ring of shared-memory stages with TMA (with the block's zero points and scales: the compute warps never wait on
global memory) and signals an mbarrier per stage; the compute warpgroup waits on it, makes
the codes bf16 ``q - z`` two per word operation, as ``_gptq_gemm_pairs_kernel`` does, and multiplies them from
registers (``wgmma`` with A in registers: the weight tile is the first operand, ``W^T X^T``), then frees the stage.
Loads for later stages are in flight all the while, whatever the compute warps are doing. On Hopper it is launched
with programmatic dependent launch (``triton_utils.pdl``): its programs may start while the kernel before (a norm,
attention, SiLU) still runs, and stream their first stages' weights before ``griddepcontrol.wait``.

Measured on the H200 (``milestones/results/m7_ws_decode.py``): 1.00-1.16x the tuned Triton plans, 1.45-2.16x bf16 at
one row. The split moved the limit rather than removing it: the compute warpgroup now bounds the large projections,
and on the small ones the loader alone is slower than 3x bf16 allows.

Gluon runs on the GPU only (the interpreter cannot run it): CPU tests compile it for sm_90 and check the reference
path it shares with the Triton kernels (``gptq_gemm_reference``); GPU tests compare it with that reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from folovllm.model_executor.layers.quantization.ops.triton_gptq import PER_CHANNEL, SLICE_ROWS, block_rows
from folovllm.triton_utils.counters import tile_counters
from folovllm.triton_utils.pdl import grid_launch_dependents, grid_wait, pdl_supported
from folovllm.utils import cdiv

ROWS = gl.constexpr(SLICE_ROWS)  # word rows per K block (a block holds block_rows(BITS) input rows)
M_TILES = (8, 16, 32, 64)  # rows of X per product (``wgmma``'s N) in decode: one tile holds every row
WS_MAX_M = M_TILES[-1]
PREFILL_M_TILE = 128  # prefill: tiles of 128 rows of X along the grid's third axis, the weights read once per tile


_PER_ASM = 4  # product operands one ``_byte_perm_asm`` block makes (its outputs $0..$3; its inputs follow)
PER_ASM = gl.constexpr(_PER_ASM)
_CONSTRAINTS = gl.constexpr(",".join(["=r"] * _PER_ASM + ["r"] * 3))
_SCALED_CONSTRAINTS = gl.constexpr(",".join(["=r"] * _PER_ASM + ["r"] * 4))


@gluon.constexpr_function
def _byte_perm_asm(bits: int, q: int, scaled: bool = False) -> str:
    """PTX that makes product operands ``q * PER_ASM ...`` from two words of a row (``$4``, ``$5``: word rows ``c`` and
    ``c + 1``, the two K positions one register of ``wgmma``'s A holds): ``prmt`` puts the two words' bytes holding
    those fields side by side, one 16-bit half each; per field a shift and one ``lop3`` (``(t & mask) | 0x4300``)
    make both halves bf16 ``128 + q``, and ``sub.bf16x2`` takes ``128 + z`` (``$6``) from both. ``scaled``: then
    ``mul.rn.bf16x2`` by the scale (``$7``), so the operands are the weights themselves, rounded to bf16."""
    fields_per_half = 16 // bits
    first = q * _PER_ASM
    selector = "0x5410" if first < fields_per_half else "0x7632"
    mask = hex(((1 << bits) - 1) * 0x10001)
    word_c, word_next, off = (f"${_PER_ASM + i}" for i in range(3))
    lines = ["{", ".reg .b32 t, u;", f"prmt.b32 t, {word_c}, {word_next}, {selector};"]
    for i in range(_PER_ASM):
        shift = ((first + i) % fields_per_half) * bits
        src = "t"
        if shift:
            lines.append(f"shr.u32 u, t, {shift};")
            src = "u"
        lines.append(f"lop3.b32 u, {src}, {mask}, 0x43004300, 0xEA;")
        if scaled:
            lines += [f"sub.bf16x2 u, u, {off};", f"mul.rn.bf16x2 ${i}, u, ${_PER_ASM + 3};"]
        else:
            lines.append(f"sub.bf16x2 ${i}, u, {off};")
    return "\n".join(lines + ["}"])


@gluon.jit
def ring(w_desc, x_desc, z_desc, STAGES: gl.constexpr, PACK: gl.constexpr):
    """The shared-memory ring: per stage a block's words, its PACK slices of X, its group's zero points and scales,
    and two barriers, ``ready`` (the loader's copies landed) and ``empty`` (the compute warps are done with it)."""
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES * PACK] + x_desc.block_type.shape, x_desc.layout)
    z_bufs = gl.allocate_shared_memory(z_desc.dtype, [STAGES] + z_desc.block_type.shape, z_desc.layout)
    s_bufs = gl.allocate_shared_memory(z_desc.dtype, [STAGES] + z_desc.block_type.shape, z_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    return w_bufs, x_bufs, z_bufs, s_bufs, ready, empty


@gluon.jit
def load_weights(w_desc, x_desc, z_desc, s_desc, bar, w_bufs, z_bufs, s_bufs, s, blk, off_n, last_group,
                 GROUP_SIZE: gl.constexpr, PACK: gl.constexpr, pred=True):  # fmt: skip
    """TMA K block ``blk``'s words from column ``off_n`` into stage ``s``, with its group's zero points and scales
    (only if ``pred``); ``bar`` expects the block's X slices too (``load_x``), so it completes when those have landed
    as well."""
    nbytes: gl.constexpr = w_desc.block_type.nbytes + PACK * x_desc.block_type.nbytes + 2 * z_desc.block_type.nbytes
    mbarrier.expect(bar, nbytes, pred=pred)
    tma.async_copy_global_to_shared(w_desc, [blk * ROWS, off_n], bar, w_bufs.index(s), pred=pred)
    g = gl.minimum(blk * ROWS * PACK // GROUP_SIZE, last_group)
    tma.async_copy_global_to_shared(z_desc, [g, off_n], bar, z_bufs.index(s), pred=pred)
    tma.async_copy_global_to_shared(s_desc, [g, off_n], bar, s_bufs.index(s), pred=pred)


@gluon.jit
def load_x(x_desc, bar, x_bufs, s, blk, off_m, PACK: gl.constexpr, pred=True):
    """TMA K block ``blk``'s PACK 16-column slices of X's rows from ``off_m`` into stage ``s`` (only if ``pred``)."""
    for j in gl.static_range(PACK):
        tma.async_copy_global_to_shared(x_desc, [off_m, (blk * PACK + j) * ROWS], bar, x_bufs.index(s * PACK + j),
                                        pred=pred)  # fmt: skip


@gluon.jit
def load_block(w_desc, x_desc, z_desc, s_desc, bar, w_bufs, x_bufs, z_bufs, s_bufs, s, blk, off_n, off_m, last_group,
               GROUP_SIZE: gl.constexpr, PACK: gl.constexpr):  # fmt: skip
    """TMA K block ``blk`` of the columns from ``off_n`` into stage ``s``: its words, its group's zero points and scales
    and its PACK 16-column slices of X's rows from ``off_m``; ``bar`` completes when all the bytes have landed."""
    load_weights(w_desc, x_desc, z_desc, s_desc, bar, w_bufs, z_bufs, s_bufs, s, blk, off_n, last_group, GROUP_SIZE,
                 PACK)  # fmt: skip
    load_x(x_desc, bar, x_bufs, s, blk, off_m, PACK)


@gluon.jit
def _load_partition(w_desc, x_desc, z_desc, s_desc, ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, first, count, off_n,
                    off_m, last_group, GROUP_SIZE: gl.constexpr, STAGES: gl.constexpr, PACK: gl.constexpr,
                    PDL: gl.constexpr = False):  # fmt: skip
    """The loader warp: for each K block, wait for its stage to be free, then load the block into it. Under ``PDL``
    the first ``STAGES`` blocks' weights go out before ``grid_wait``, while the kernel before (which writes X) may
    still run, and their X slices after it."""
    start = 0
    if PDL:  # straight-line code (predicated copies), so the wait is one instruction between the two halves
        for i in gl.static_range(STAGES):
            load_weights(w_desc, x_desc, z_desc, s_desc, ready.index(i), w_bufs, z_bufs, s_bufs, i, first + i, off_n,
                         last_group, GROUP_SIZE, PACK, i < count)  # fmt: skip
        grid_wait()
        for i in gl.static_range(STAGES):
            load_x(x_desc, ready.index(i), x_bufs, i, first + i, off_m, PACK, i < count)
        start = STAGES
    for i in range(start, count):
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
        load_block(w_desc, x_desc, z_desc, s_desc, ready.index(s), w_bufs, x_bufs, z_bufs, s_bufs, s, first + i, off_n,
                   off_m, last_group, GROUP_SIZE, PACK)  # fmt: skip


@gluon.jit
def _byte_perm_products(acc, words, offs, scales, x_bufs, s, BITS: gl.constexpr, ASYNC: gl.constexpr):
    """``acc`` plus the products of the K block in stage ``s`` with its codes made by ``_byte_perm_asm`` from
    ``words`` and ``offs`` (``128 + z``), one per 16-row slice of X; with ``scales`` (not None) the codes are scaled
    to the weights themselves."""
    PACK: gl.constexpr = 32 // BITS
    for q in gl.static_range(PACK // PER_ASM):
        if scales is None:
            codes = gl.inline_asm_elementwise(_byte_perm_asm(BITS, q), _CONSTRAINTS, [words, offs],
                                              dtype=(gl.bfloat16,) * PER_ASM, is_pure=True, pack=2)  # fmt: skip
        else:
            codes = gl.inline_asm_elementwise(_byte_perm_asm(BITS, q, True), _SCALED_CONSTRAINTS, [words, offs, scales],
                                              dtype=(gl.bfloat16,) * PER_ASM, is_pure=True, pack=2)  # fmt: skip
        for i in gl.static_range(PER_ASM):
            acc = warpgroup_mma(codes[i], x_bufs.index(s * PACK + q * PER_ASM + i).permute((1, 0)), acc, is_async=ASYNC)
    return acc


@gluon.jit
def block_product(w_bufs, x_bufs, z_bufs, s_bufs, empty, s, BITS: gl.constexpr, BLOCK_N: gl.constexpr,
                  ASYNC: gl.constexpr, M_TILE: gl.constexpr, WARPS: gl.constexpr, BYTE_PERM: gl.constexpr):  # fmt: skip
    """The scaled product of the K block in stage ``s`` (landed): codes to bf16 ``q - z`` two per word operation
    (fields ``j`` and ``j + PACK/2`` of a word), one product per 16-row slice, the group's scale on the block's sum.
    Frees the stage once it has read it."""
    PACK: gl.constexpr = 32 // BITS
    HALF: gl.constexpr = PACK // 2
    MASK: gl.constexpr = ((1 << BITS) - 1) * 0x10001
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, M_TILE, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    z = z_bufs.index(s).reshape([BLOCK_N]).load(gl.SliceLayout(1, a_layout))
    off = (128.0 + z.to(gl.float32)).to(gl.bfloat16)[:, None]
    words = w_bufs.index(s).permute((1, 0)).load(a_layout)
    part = gl.zeros([BLOCK_N, M_TILE], gl.float32, mma)
    if BYTE_PERM:
        offs = off + gl.zeros([BLOCK_N, 16], gl.bfloat16, a_layout)
        part = _byte_perm_products(part, words, offs, None, x_bufs, s, BITS, ASYNC)
    else:
        for j in gl.static_range(HALF):
            pair = ((words >> (j * BITS)) & MASK) | 0x43004300
            lo = pair.to(gl.int16).to(gl.bfloat16, bitcast=True) - off
            hi = (pair >> 16).to(gl.int16).to(gl.bfloat16, bitcast=True) - off
            part = warpgroup_mma(lo, x_bufs.index(s * PACK + j).permute((1, 0)), part, is_async=ASYNC)
            part = warpgroup_mma(hi, x_bufs.index(s * PACK + j + HALF).permute((1, 0)), part, is_async=ASYNC)
    if ASYNC:
        part = warpgroup_mma_wait(num_outstanding=0, deps=[part])
    sc = s_bufs.index(s).reshape([BLOCK_N]).load(gl.SliceLayout(1, mma))  # read last: fewer live registers
    mbarrier.arrive(empty.index(s), count=1)
    return part * sc.to(gl.float32)[:, None]


@gluon.jit
def scaled_block_product(acc, w_bufs, x_bufs, z_bufs, s_bufs, empty, s, BITS: gl.constexpr, BLOCK_N: gl.constexpr,
                         ASYNC: gl.constexpr, M_TILE: gl.constexpr, WARPS: gl.constexpr):  # fmt: skip
    """``acc`` plus the product of the K block in stage ``s`` (landed) with the weights themselves as operands: codes
    made bf16 ``(q - z) * scale`` (``_byte_perm_asm``, scaled), so the products go straight into ``acc`` and no
    block's product is held apart. Frees the stage once its products are done."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, M_TILE, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    column: gl.constexpr = gl.SliceLayout(1, a_layout)
    zero = gl.zeros([BLOCK_N, 16], gl.bfloat16, a_layout)
    z = z_bufs.index(s).reshape([BLOCK_N]).load(column)
    offs = (128.0 + z.to(gl.float32)).to(gl.bfloat16)[:, None] + zero
    scales = s_bufs.index(s).reshape([BLOCK_N]).load(column).to(gl.bfloat16)[:, None] + zero
    words = w_bufs.index(s).permute((1, 0)).load(a_layout)
    acc = _byte_perm_products(acc, words, offs, scales, x_bufs, s, BITS, ASYNC)
    if ASYNC:
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
    mbarrier.arrive(empty.index(s), count=1)
    return acc


@gluon.jit
def _compute_partition(ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, count,
                       BITS: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                       ASYNC: gl.constexpr, M_TILE: gl.constexpr, WARPS: gl.constexpr,
                       BYTE_PERM: gl.constexpr, SCALED: gl.constexpr):  # fmt: skip
    """The compute warpgroup: each K block's scaled product as its stage lands, summed (``SCALED``: the weights as
    operands, accumulated in place). It reads shared memory only: the loader brings the zero points and scales with
    the words."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, M_TILE, 16])
    acc = gl.zeros([BLOCK_N, M_TILE], gl.float32, mma)
    for i in range(count):
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        if SCALED:
            acc = scaled_block_product(acc, w_bufs, x_bufs, z_bufs, s_bufs, empty, s, BITS, BLOCK_N, ASYNC, M_TILE,
                                       WARPS)  # fmt: skip
        else:
            acc += block_product(w_bufs, x_bufs, z_bufs, s_bufs, empty, s, BITS, BLOCK_N, ASYNC, M_TILE, WARPS,
                                 BYTE_PERM)  # fmt: skip
    return (acc,)


@gluon.jit
def gptq_decode_ws_kernel(w_desc, x_desc, z_desc, s_desc, Bias, Out, Partials, Counters, M, N, K, blocks_per_split,
                          BITS: gl.constexpr, GROUP_SIZE: gl.constexpr, HAS_BIAS: gl.constexpr,
                          BLOCK_N: gl.constexpr, SPLIT_K: gl.constexpr, STAGES: gl.constexpr,
                          ASYNC: gl.constexpr, WARPS: gl.constexpr, BYTE_PERM: gl.constexpr,
                          PDL: gl.constexpr, SCALED: gl.constexpr = False):  # fmt: skip
    """``Out [M, N] = X [M, K] @ W`` on bf16 X in tiles of ``M_TILE`` rows (8 to 128, the X descriptor's rows): program
    ``(n, split, m)`` owns ``BLOCK_N`` columns of rows ``m * M_TILE ...`` and ``blocks_per_split`` K blocks; with
    ``SPLIT_K > 1`` the splits meet as ``split_k.store_tile`` does. Under ``PDL`` (``triton_utils.pdl``) the next
    kernel may be scheduled at once, and this one streams its first weights before the kernel before it has ended,
    everything else after."""
    if PDL:
        grid_launch_dependents()
    PACK: gl.constexpr = 32 // BITS
    M_TILE: gl.constexpr = x_desc.block_type.shape[0]
    pid_n = gl.program_id(0)
    split = gl.program_id(1)
    off_n = pid_n * BLOCK_N
    pid_m = gl.program_id(2)
    off_m = pid_m * M_TILE
    total = gl.cdiv(K, ROWS * PACK)
    first = split * blocks_per_split
    count = gl.maximum(gl.minimum(first + blocks_per_split, total) - first, 0)
    last_group = (K - 1) // GROUP_SIZE

    w_bufs, x_bufs, z_bufs, s_bufs, ready, empty = ring(w_desc, x_desc, z_desc, STAGES, PACK)

    # fmt: off
    results = gl.warp_specialize([
        (_compute_partition, (ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, count, BITS, BLOCK_N, STAGES, ASYNC,
                              M_TILE, WARPS, BYTE_PERM, SCALED)),
        (_load_partition, (w_desc, x_desc, z_desc, s_desc, ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, first, count,
                           off_n, off_m, last_group, GROUP_SIZE, STAGES, PACK, PDL)),
    ], [1], [24])
    # fmt: on
    if PDL:
        grid_wait()  # returned in the loader already; here too, so that no write of this warpgroup can precede it
    store_tile(results[0], Bias, Out, Partials, Counters, M, N, pid_n, split, HAS_BIAS, BLOCK_N, SPLIT_K, WARPS, off_m,
               pid_m * gl.num_programs(0) + pid_n)  # fmt: skip


_LOADS_IN_FLIGHT = 64  # partial sums a thread loads at once in the reduction: more spilled at the register caps offered


@gluon.constexpr_function
def _splits_in_flight(sums: int, split_k: int) -> int:
    """How many splits' partial sums (``sums`` a thread each) the reduction loads at once: with up to 16 sums a thread
    as many as fit ``_LOADS_IN_FLIGHT`` registers (all of them at one row), larger tiles one at a time."""
    return min(split_k, _LOADS_IN_FLIGHT // sums) if sums <= 16 else 1


@gluon.constexpr_function
def _vector_partials(m_tile: int, split_k: int) -> bool:
    """Whether a split-K tile's partial sums go through a layout of their own (16-row tiles): ``wgmma``'s accumulator
    gives each thread rows a column apart in ``Out``, so its sums would move four bytes at a time."""
    return m_tile == 16 and split_k > 1


@gluon.jit
def store_tile(acc, Bias, Out, Partials, Counters, M, N, pid_n, split, HAS_BIAS: gl.constexpr, BLOCK_N: gl.constexpr,
               SPLIT_K: gl.constexpr, WARPS: gl.constexpr, off_m=0, tile=None):  # fmt: skip
    """Column tile ``pid_n``'s sums (of X's rows from ``off_m``) of K split ``split`` into ``Out`` (plus the bias): with
    ``SPLIT_K > 1`` each split stores its partial sums and counts its arrival on counter ``tile`` (default
    ``pid_n``), and the last to arrive adds them all in split order, as ``split_k.store_tile`` does. 16-row tiles keep
    their partial sums in a layout of their own (``_vector_partials``): 16-byte copies, 7% off ``down_proj`` at 16 rows
    on the H200 (``milestones/results/M7-reduce-vec-h200.json``)."""
    M_TILE: gl.constexpr = acc.type.shape[1]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, M_TILE, 16])
    VEC: gl.constexpr = _vector_partials(M_TILE, SPLIT_K)
    lay: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [WARPS, 1], [1, 0]) if VEC else mma
    acc = gl.convert_layout(acc, lay)
    if tile is None:
        tile = pid_n
    rn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, lay))
    rm = off_m + gl.arange(0, M_TILE, layout=gl.SliceLayout(0, lay))
    mask = (rn < N)[:, None] & (rm < M)[None, :]
    offs = rm[None, :] * N + rn[:, None]
    store_mask = mask
    if SPLIT_K > 1:
        if VEC:  # partial sums stored column by column, a thread's four rows in one 16-byte copy
            offs_p = rn[:, None] * M + rm[None, :]
        else:
            offs_p = offs
        gl.store(Partials + split * M * N + offs_p, acc, mask=mask)
        gl.thread_barrier()
        arrived = gl.atomic_add(Counters + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            acc = gl.zeros_like(acc)
            IN_FLIGHT: gl.constexpr = _splits_in_flight(BLOCK_N * M_TILE // (32 * WARPS), SPLIT_K)
            for first in range(0, SPLIT_K, IN_FLIGHT):  # groups of IN_FLIGHT splits' loads at once, in split order
                for j in gl.static_range(IN_FLIGHT):
                    ok = mask if SPLIT_K % IN_FLIGHT == 0 else mask & (first + j < SPLIT_K)
                    acc += gl.load(Partials + (first + j) * M * N + offs_p, mask=ok, other=0.0)
            gl.atomic_xchg(Counters + tile, 0)
        store_mask = mask & (arrived == SPLIT_K - 1)
    if HAS_BIAS:
        acc += gl.load(Bias + rn, mask=rn < N, other=0.0).to(gl.float32)[:, None]
    gl.store(Out + offs, acc.to(Out.dtype.element_ty), mask=store_mask)


@dataclass(frozen=True)
class WsPlan:
    """One launch of the warp-specialized kernel: columns per program, K split, ring depth, async products, the
    register cap per thread (``maxnreg``: a program of 4 compute warps and a loader is allocated 8 warps' registers,
    so 80 leaves room for three programs per SM, 64 for four), compute warps (4 or 8: one or two warpgroups, each
    64 columns per product) and rows of X per product (decode: ``M_TILES``, at least the rows of X; prefill:
    ``PREFILL_M_TILE``, a tile of programs per 128 rows). A thread holds ``block_n * m_tile / (32 * num_warps)``
    accumulators twice (the sum and the block's product), so 64 rows want 64 columns per warpgroup and about 96
    registers, 128 rows about 168."""

    block_n: int = 128
    split_k: int = 4
    stages: int = 4
    async_mma: bool = False  # waiting once per block instead of per product was never faster by more than 3%
    maxnreg: int = 80
    num_warps: int = 4
    m_tile: int = 16
    byte_perm: bool = True  # codes made by ``_byte_perm_asm`` (else by Gluon integer operations, the Triton way)
    scaled: bool = False  # operands (q - z) * scale in bf16, summed in place (``scaled_block_product``): prefill


def ws_supported(x: torch.Tensor, qweight: torch.Tensor, perm: torch.Tensor | None, bits: int, group_size: int) -> bool:
    """Where the kernel applies: a Hopper GPU, bf16 X with 16-byte aligned rows (TMA), a multiple of 8 columns
    (16-byte rows of fp16 scales), 2- or 4-bit codes, one scale per K block or per channel, no act-order
    permutation."""
    return (
        x.is_cuda
        and torch.cuda.get_device_capability(x.device)[0] == 9
        and x.dtype == torch.bfloat16
        and x.stride(1) == 1
        and (x.stride(0) * 2) % 16 == 0
        and x.data_ptr() % 16 == 0
        and qweight.shape[1] % 8 == 0
        and bits in (2, 4)
        and (group_size == -1 or group_size % block_rows(bits) == 0)
        and perm is None
    )


def _descriptor_layouts(plan: WsPlan) -> tuple[gl.NVMMASharedLayout, gl.NVMMASharedLayout, gl.NVMMASharedLayout]:
    """Shared-memory layouts of a stage's words ``[16, block_n]``, of one X slice ``[m_tile, 16]`` and of a group's
    zero points (or scales) ``[1, block_n]``."""
    return (gl.NVMMASharedLayout.get_default_for([16, plan.block_n], gl.int32),
            gl.NVMMASharedLayout.get_default_for([plan.m_tile, 16], gl.bfloat16),
            gl.NVMMASharedLayout.get_default_for([1, plan.block_n], gl.float16))  # fmt: skip


def descriptors(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, plan: WsPlan
) -> tuple[TensorDescriptor, ...]:
    """The TMA descriptors of one launch: a block of words ``[16, block_n]``, one X slice ``[m_tile, 16]``, and a
    group's zero points and scales ``[1, block_n]``."""
    w_layout, x_layout, z_layout = _descriptor_layouts(plan)
    return (TensorDescriptor.from_tensor(qweight, [16, plan.block_n], w_layout),
            TensorDescriptor.from_tensor(x, [plan.m_tile, 16], x_layout),
            TensorDescriptor.from_tensor(zeros, [1, plan.block_n], z_layout),
            TensorDescriptor.from_tensor(scales, [1, plan.block_n], z_layout))  # fmt: skip


def _constexprs(plan: WsPlan, bits: int, group_size: int, has_bias: bool, pdl: bool = False) -> dict:
    """The kernel's compile-time arguments (per channel, ``group_size=-1``, as one group longer than any K)."""
    return dict(BITS=bits, GROUP_SIZE=PER_CHANNEL if group_size == -1 else group_size, HAS_BIAS=has_bias,
                BLOCK_N=plan.block_n, SPLIT_K=plan.split_k, STAGES=plan.stages, ASYNC=plan.async_mma,
                WARPS=plan.num_warps, BYTE_PERM=plan.byte_perm, PDL=pdl, SCALED=plan.scaled)  # fmt: skip


def compile_ws_plan(
    plan: WsPlan,
    bits: int = 4,
    group_size: int = 128,
    capability: int = 90,
    pdl: bool = False,
    rows_divisible: bool = False,
) -> dict[str, str]:
    """The kernel for ``plan`` compiled for compute capability ``capability`` on any machine (``compile_for_gpu``);
    ``rows_divisible``: as launched with a multiple of 16 rows of X, which Triton specializes on."""
    from folovllm.triton_utils.offline_compile import compile_for_gpu

    w_layout, x_layout, z_layout = _descriptor_layouts(plan)
    z_type = f"tensordesc<fp16[1, {plan.block_n}],{z_layout!r}>"
    types = dict(w_desc=f"tensordesc<i32[16, {plan.block_n}],{w_layout!r}>",
                 x_desc=f"tensordesc<bf16[{plan.m_tile}, 16],{x_layout!r}>", z_desc=z_type, s_desc=z_type,
                 Bias="*bf16", Out="*bf16", Partials="*fp32", Counters="*i32", M="i32", N="i32", K="i32",
                 blocks_per_split="i32")  # fmt: skip
    divisible = ("M", "N", "K") if rows_divisible else ("N", "K")
    return compile_for_gpu(gptq_decode_ws_kernel, types, _constexprs(plan, bits, group_size, False, pdl), divisible,
                           capability, plan.num_warps, 1, plan.maxnreg)  # fmt: skip


def outputs(x: torch.Tensor, n: int, plan: WsPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A launch's output ``[M, N]`` in X's dtype, and with ``plan.split_k > 1`` its fp32 partial sums
    ``[split_k, M, N]`` and the tiles' arrival counters (``store_tile``, one per column tile and tile of rows);
    without, the output stands in for both."""
    m = x.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if plan.split_k == 1:
        return out, out, out
    partials = torch.empty(plan.split_k, m, n, dtype=torch.float32, device=x.device)
    return out, partials, tile_counters(x.device, cdiv(n, plan.block_n) * cdiv(m, plan.m_tile))


def launch_gptq_decode_ws(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    plan: WsPlan,
) -> torch.Tensor:
    """``x [M, K] @ W`` (kernel layout, ``gptq_gemm.pack_for_kernel``) -> ``[M, N]`` bf16, in tiles of ``plan.m_tile``
    rows; unchecked: callers test ``ws_supported`` first. Launched with PDL where ``pdl_supported``."""
    m, k = x.shape
    n = qweight.shape[1]
    per_split = cdiv(cdiv(k, block_rows(bits)), plan.split_k)
    w_desc, x_desc, z_desc, s_desc = descriptors(x, qweight, scales, zeros, plan)
    out, partials, counters = outputs(x, n, plan)
    pdl = pdl_supported(x.device)
    gptq_decode_ws_kernel[(cdiv(n, plan.block_n), plan.split_k, cdiv(m, plan.m_tile))](
        w_desc, x_desc, z_desc, s_desc, out if bias is None else bias, out, partials, counters, m, n, k, per_split,
        **_constexprs(plan, bits, group_size, bias is not None, pdl), num_warps=plan.num_warps, maxnreg=plan.maxnreg,
        launch_pdl=pdl,
    )  # fmt: skip
    return out
