"""#15, twenty-third session: two compute warpgroups per loader (an experiment, not the engine's kernel).

The stream-K runs (``m7_streamk.py``) were fastest with the most programs per SM: more compute warpgroups, not longer
runs. A tuned program is one loader warp and one compute warpgroup, allocated eight warps' registers (three warps
idle). Here a second compute warpgroup takes every other K block from the same ring (blocks ``i`` with ``i % 2 == 1``),
sums its own products and hands its sum to the first through shared memory; the epilogue is the engine's
(``store_tile``). Loader, ring and products are the engine's (``load_block``, ``block_product``). Each plan is timed
beside the tuned plan it doubles, and checked against the reference.

    PYTHONPATH=src python3 milestones/results/m7_pingpong.py --compile   # CPU: compile for sm_90, registers
    PYTHONPATH=src python3 milestones/results/m7_pingpong.py OUT.json    # H200
"""

from __future__ import annotations

import dataclasses
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
from folovllm.model_executor.layers.quantization.ops import gptq_gemm as ops  # noqa: E402
from folovllm.utils import cdiv  # noqa: E402


@gluon.jit
def _half_sum(ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, count, C: gl.constexpr, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr, M_TILE: gl.constexpr):  # fmt: skip
    """The scaled products of blocks ``C, C + 2, ...`` of this program's run."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, M_TILE, 16])
    acc = gl.zeros([BLOCK_N, M_TILE], gl.float32, mma)
    for i in range(C, count, 2):
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        acc += ws.block_product(w_bufs, x_bufs, z_bufs, s_bufs, empty, s, 4, BLOCK_N, False, M_TILE, 4, True)
    return acc


@gluon.jit
def _first(ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, hand, done, count, BLOCK_N: gl.constexpr,
           STAGES: gl.constexpr, M_TILE: gl.constexpr):  # fmt: skip
    """Compute warpgroup 0: the even blocks, then the odd blocks' sum from warpgroup 1."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, M_TILE, 16])
    acc = _half_sum(ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, count, 0, BLOCK_N, STAGES, M_TILE)
    mbarrier.wait(done, 0)
    return (acc + hand.load(mma),)


@gluon.jit
def _second(ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, hand, done, count, BLOCK_N: gl.constexpr,
            STAGES: gl.constexpr, M_TILE: gl.constexpr):  # fmt: skip
    """Compute warpgroup 1: the odd blocks; their sum goes to warpgroup 0 through shared memory."""
    hand.store(_half_sum(ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, count, 1, BLOCK_N, STAGES, M_TILE))
    mbarrier.arrive(done, count=1)


@gluon.jit
def pingpong_kernel(w_desc, x_desc, z_desc, s_desc, Bias, Out, Partials, Counters, M, N, K, blocks_per_split,
                    BLOCK_N: gl.constexpr, SPLIT_K: gl.constexpr, STAGES: gl.constexpr, REGS: gl.constexpr):  # fmt: skip
    PACK: gl.constexpr = 8
    M_TILE: gl.constexpr = x_desc.block_type.shape[0]
    pid_n = gl.program_id(0)
    split = gl.program_id(1)
    total = gl.cdiv(K, ws.ROWS * PACK)
    first = split * blocks_per_split
    count = gl.maximum(gl.minimum(first + blocks_per_split, total) - first, 0)
    w_bufs, x_bufs, z_bufs, s_bufs, ready, empty = ws.ring(w_desc, x_desc, z_desc, STAGES, PACK)
    hand = gl.allocate_shared_memory(gl.float32, [BLOCK_N, M_TILE], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    done = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(done, count=1)
    # fmt: off
    results = gl.warp_specialize([
        (_first, (ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, hand, done, count, BLOCK_N, STAGES, M_TILE)),
        (_second, (ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, hand, done, count, BLOCK_N, STAGES, M_TILE)),
        (ws._load_partition, (w_desc, x_desc, z_desc, s_desc, ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, first,
                              count, pid_n * BLOCK_N, (K - 1) // 128, 128, STAGES, PACK)),
    ], [4, 1], [REGS, 24])
    # fmt: on
    ws.store_tile(results[0], Bias, Out, Partials, Counters, M, N, pid_n, split, False, BLOCK_N, SPLIT_K, 4)


def launch(x: torch.Tensor, layer: dict, plan: ws.WsPlan) -> torch.Tensor:
    m, k = x.shape
    n = layer["pairs"].shape[1]
    descs = ws.descriptors(x, layer["pairs"], layer["scales"], layer["zeros"], plan)
    out, partials, counters = ws.outputs(x, n, plan)
    pingpong_kernel[(cdiv(n, plan.block_n), plan.split_k)](*descs, out, out, partials, counters, m, n, k,
                                           cdiv(cdiv(k, 128), plan.split_k), BLOCK_N=plan.block_n,
                                           SPLIT_K=plan.split_k, STAGES=plan.stages, REGS=plan.maxnreg,
                                           num_warps=4, maxnreg=plan.maxnreg)  # fmt: skip
    return out


def compile_check() -> None:
    from folovllm.triton_utils.offline_compile import compile_for_gpu, ptxas_report

    for block_n, m_tile, stages, maxnreg in ((128, 8, 2, 80), (128, 16, 4, 80), (64, 16, 4, 64), (128, 8, 4, 64)):
        plan = ws.WsPlan(block_n, 4, stages, False, maxnreg, 4, m_tile)
        w_l, x_l, z_l = ws._descriptor_layouts(plan)
        z_t = f"tensordesc<fp16[1, {block_n}],{z_l!r}>"
        types = dict(w_desc=f"tensordesc<i32[16, {block_n}],{w_l!r}>", x_desc=f"tensordesc<bf16[{m_tile}, 16],{x_l!r}>",
                     z_desc=z_t, s_desc=z_t, Bias="*bf16", Out="*bf16", Partials="*fp32", Counters="*i32", M="i32",
                     N="i32", K="i32", blocks_per_split="i32")  # fmt: skip
        asm = compile_for_gpu(pingpong_kernel, types, dict(BLOCK_N=block_n, SPLIT_K=4, STAGES=stages, REGS=maxnreg),
                              ("N", "K"), 90, 4, 1, maxnreg)  # fmt: skip
        warps = asm["ttgir"].split('"ttg.num-warps" = ')[1].split(" ")[0]
        print(block_n, m_tile, stages, maxnreg, ptxas_report(asm["ptx"]), "shared", asm["shared"], "warps", warps)


def _configs(tuned: ops.GemmPlan, m: int) -> list[dict]:
    """The tuned plan's ring depth, register cap and K split varied; none where it has two warpgroups of its own or more
    than 16 rows per product."""
    plan = ops.as_ws_plan(tuned, m)
    if plan.num_warps != 4 or plan.m_tile > 16:
        return []
    return [{"stages": stages, "maxnreg": maxnreg, "split_k": split}
            for stages, maxnreg, split in itertools.product((2, 4), (80, 64), (plan.split_k, 2 * plan.split_k))]  # fmt: skip


def _variant(x: torch.Tensor, layer: dict, tuned: ops.GemmPlan, cfg: dict) -> torch.Tensor:
    return launch(x, layer, dataclasses.replace(ops.as_ws_plan(tuned, x.shape[0]), **cfg))


def main(out: str) -> None:
    sweep_variants(out, "m7_pingpong", "pingpong", (1, 4, 16), _configs, _variant)


if __name__ == "__main__":
    if sys.argv[1] == "--compile":
        compile_check()
    else:
        main(sys.argv[1])
