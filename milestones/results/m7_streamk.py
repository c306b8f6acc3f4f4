"""#15, twenty-third session: the Gluon decode kernel as a persistent, stream-K launch (an experiment, not the engine's).

The twins of ``m7_ws_anatomy.py`` showed that on the small projections the tuned plans' loads and products hardly
overlap: each of ``qkv_proj``'s 384 programs runs four blocks through its ring, all start together, and the ring never
reaches a steady state. Here ``P`` programs (a multiple of the SM count) each take one contiguous run of the
``tiles x blocks`` work items, tile-major, through one ring: a run crosses tiles, a tile it covers whole is stored at
once, and the (at most two) tiles it covers in part meet the other programs' parts as split-K does. The loader and
the compute loop are the engine's (same ring, same codes, same products), only walking items instead of one tile's
blocks. Each configuration (programs per SM, ring depth, columns per tile) is checked against the reference.

    PYTHONPATH=src python3 milestones/results/m7_streamk.py --compile     # CPU: compile for sm_90, registers
    PYTHONPATH=src python3 milestones/results/m7_streamk.py OUT.json      # H200
"""

from __future__ import annotations

import itertools
import os
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from m7_decode_limits import sweep_variants  # noqa: E402

from folovllm.model_executor.layers.quantization.ops import gluon_gptq as ws  # noqa: E402
from folovllm.triton_utils.counters import tile_counters  # noqa: E402
from folovllm.utils import cdiv  # noqa: E402

ROWS = ws.ROWS


@gluon.jit
def _load_items(w_desc, x_desc, z_desc, s_desc, ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, start, count, B,
                last_group, GROUP_SIZE: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                PACK: gl.constexpr):  # fmt: skip
    """The engine's loader walking work items: item ``start + i`` is block ``% B`` of tile ``// B``."""
    for i in range(count):
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
        item = start + i
        ws.load_block(w_desc, x_desc, z_desc, s_desc, ready.index(s), w_bufs, x_bufs, z_bufs, s_bufs, s, item % B,
                      (item // B) * BLOCK_N, last_group, GROUP_SIZE, PACK)  # fmt: skip


@gluon.jit
def _compute_items(ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, Out, M, N, start, count, B,
                   BLOCK_N: gl.constexpr, STAGES: gl.constexpr, M_TILE: gl.constexpr, WARPS: gl.constexpr):  # fmt: skip
    """The engine's compute loop walking work items. A tile this run covers whole is stored here; the partial sums of
    its first and last tiles (when covered in part) are returned for the epilogue to meet the other programs'."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, M_TILE, 16])
    rn0 = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    rm = gl.arange(0, M_TILE, layout=gl.SliceLayout(0, mma))
    first_tile = start // B
    acc = gl.zeros([BLOCK_N, M_TILE], gl.float32, mma)
    acc_first = gl.zeros([BLOCK_N, M_TILE], gl.float32, mma)
    for i in range(count):
        s = i % STAGES
        item = start + i
        blk = item % B
        tile = item // B
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        acc += ws.block_product(w_bufs, x_bufs, z_bufs, s_bufs, empty, s, 4, BLOCK_N, False, M_TILE, WARPS, True)
        if (blk == B - 1) | (i == count - 1):  # the end of this run's part of a tile
            whole = (blk == B - 1) & (gl.maximum(start, tile * B) == tile * B)
            if whole:
                rn = tile * BLOCK_N + rn0
                mask = (rn < N)[:, None] & (rm < M)[None, :]
                gl.store(Out + rm[None, :] * N + rn[:, None], acc.to(Out.dtype.element_ty), mask=mask)
            elif tile == first_tile:
                acc_first = acc
            if i < count - 1:
                acc = gl.zeros([BLOCK_N, M_TILE], gl.float32, mma)
    return acc_first, acc


@gluon.jit
def _meet(acc, tile, which, Out, Partials, Counters, M, N, P, L, B,
          BLOCK_N: gl.constexpr, M_TILE: gl.constexpr, mma: gl.constexpr):  # fmt: skip
    """This program's partial sums of ``tile`` (its first tile: ``which`` 0, its last: 1) meet the others': the last
    program to arrive adds them all and stores the tile."""
    rn = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    rm = gl.arange(0, M_TILE, layout=gl.SliceLayout(0, mma))
    offs = rn[:, None] * M_TILE + rm[None, :]
    rows = (rm < M)[None, :] & (rn < BLOCK_N)[:, None]  # only X's rows: at M = 1 an eighth of the tile
    me = gl.program_id(0)
    gl.store(Partials + (me * 2 + which) * BLOCK_N * M_TILE + offs, acc, mask=rows)
    gl.thread_barrier()
    q0 = tile * B // L
    q1 = gl.minimum(((tile + 1) * B - 1) // L, P - 1)
    arrived = gl.atomic_add(Counters + tile, 1, sem="acq_rel")
    if arrived == q1 - q0:
        total = gl.zeros([BLOCK_N, M_TILE], gl.float32, mma)
        for q in range(q0, q1 + 1):
            w = ((q * L) // B != tile).to(gl.int32)  # tile is q's first tile (0) or its last (1)
            total += gl.load(Partials + (q * 2 + w) * BLOCK_N * M_TILE + offs, mask=rows, other=0.0)
        gl.atomic_xchg(Counters + tile, 0)
        col = tile * BLOCK_N + rn
        mask = (col < N)[:, None] & (rm < M)[None, :]
        gl.store(Out + rm[None, :] * N + col[:, None], total.to(Out.dtype.element_ty), mask=mask)


@gluon.jit
def streamk_kernel(w_desc, x_desc, z_desc, s_desc, Out, Partials, Counters, M, N, K, P, L,
                   GROUP_SIZE: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                   WARPS: gl.constexpr):  # fmt: skip
    PACK: gl.constexpr = 8
    M_TILE: gl.constexpr = x_desc.block_type.shape[0]
    B = gl.cdiv(K, ROWS * PACK)
    T = gl.cdiv(N, BLOCK_N) * B
    start = gl.program_id(0) * L
    count = gl.maximum(gl.minimum(start + L, T) - start, 0)
    last_group = (K - 1) // GROUP_SIZE
    w_bufs, x_bufs, z_bufs, s_bufs, ready, empty = ws.ring(w_desc, x_desc, z_desc, STAGES, PACK)
    # fmt: off
    results = gl.warp_specialize([
        (_compute_items, (ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, Out, M, N, start, count, B, BLOCK_N, STAGES,
                          M_TILE, WARPS)),
        (_load_items, (w_desc, x_desc, z_desc, s_desc, ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, start, count, B,
                       last_group, GROUP_SIZE, BLOCK_N, STAGES, PACK)),
    ], [1], [24])
    # fmt: on
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, M_TILE, 16])
    if count > 0:
        t0 = start // B
        t1 = (start + count - 1) // B
        end = start + count
        first_whole = (start % B == 0) & ((t0 < t1) | (end % B == 0) | (end == T))
        if not first_whole:
            _meet(results[0], t0, 0, Out, Partials, Counters, M, N, P, L, B, BLOCK_N, M_TILE, mma)
        if (t1 > t0) & (end % B != 0):
            _meet(results[1], t1, 1, Out, Partials, Counters, M, N, P, L, B, BLOCK_N, M_TILE, mma)


def launch(x: torch.Tensor, layer: dict, per_sm: int, stages: int, block_n: int, maxnreg: int = 80) -> torch.Tensor:
    m, k = x.shape
    n = layer["pairs"].shape[1]
    plan = ws.WsPlan(block_n, 1, stages, False, maxnreg, 4, next(t for t in ws.M_TILES if t >= m))
    descs = ws.descriptors(x, layer["pairs"], layer["scales"], layer["zeros"], plan)
    tiles, blocks = cdiv(n, block_n), cdiv(k, 128)
    p = min(per_sm * torch.cuda.get_device_properties(x.device).multi_processor_count, tiles * blocks)
    length = cdiv(tiles * blocks, p)
    p = cdiv(tiles * blocks, length)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    partials = torch.empty(p * 2 * block_n * plan.m_tile, dtype=torch.float32, device=x.device)
    streamk_kernel[(p,)](*descs, out, partials, tile_counters(x.device, tiles), m, n, k, p, length, GROUP_SIZE=128,
                         BLOCK_N=block_n, STAGES=stages, WARPS=4, num_warps=4, maxnreg=maxnreg)  # fmt: skip
    return out


def compile_check() -> None:
    from folovllm.triton_utils.offline_compile import compile_for_gpu, ptxas_report

    for block_n, m_tile, maxnreg in ((128, 8, 80), (128, 16, 80), (64, 16, 64)):
        plan = ws.WsPlan(block_n, 1, 2, False, maxnreg, 4, m_tile)
        w_l, x_l, z_l = ws._descriptor_layouts(plan)
        z_t = f"tensordesc<fp16[1, {block_n}],{z_l!r}>"
        types = dict(w_desc=f"tensordesc<i32[16, {block_n}],{w_l!r}>", x_desc=f"tensordesc<bf16[{m_tile}, 16],{x_l!r}>",
                     z_desc=z_t, s_desc=z_t, Out="*bf16", Partials="*fp32", Counters="*i32", M="i32", N="i32",
                     K="i32", P="i32", L="i32")  # fmt: skip
        asm = compile_for_gpu(streamk_kernel, types, dict(GROUP_SIZE=128, BLOCK_N=block_n, STAGES=2, WARPS=4),
                              ("N", "K"), 90, 4, 1, maxnreg)  # fmt: skip
        print(block_n, m_tile, maxnreg, ptxas_report(asm["ptx"]), asm["shared"])


def main(out: str) -> None:
    cfgs = [{"per_sm": per_sm, "stages": stages, "block_n": block_n}
            for per_sm, stages, block_n in itertools.product((1, 2, 3), (2, 4), (64, 128))]  # fmt: skip
    sweep_variants(out, "m7_streamk", "streamk", (1, 4, 16), lambda tuned, m: cfgs,
                   lambda x, layer, tuned, cfg: launch(x, layer, **cfg))  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1] == "--compile":
        compile_check()
    else:
        main(sys.argv[1])
