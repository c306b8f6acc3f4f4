"""#15, twenty-fourth session: the Gluon decode kernel fed from a work queue (an experiment, not the engine's).

Clocks read inside every program (``m7_ws_timeline.py --raw``) show that a launch lasts as long as its slowest SMs:
the same SMs (pairs of them, one TPC) are 10-18% slower than the median in every projection, and with the work split
evenly (every program the same blocks) their programs finish last. If each SM's rate held, sharing the work out by
rate would end the launches 10-21% sooner. Here ``per_sm`` programs per SM stay resident and take the engine's work
items (one column tile's ``blocks_per_split`` K blocks) from an atomic counter until none is left, so a fast SM takes
more. The loader warp takes each item and tells the compute warps which item each ring stage holds through a word of
shared memory per stage; the compute warps run the engine's products and, at an item's last block, the engine's
split-K epilogue (``store_tile``); the ring keeps streaming across items. The last program to finish resets the
counter, so a CUDA graph can replay the launch. Timed beside bf16 and the tuned plan, all without PDL.

    PYTHONPATH=src python3 milestones/results/m7_workqueue.py --compile     # CPU: compile for sm_90, registers
    PYTHONPATH=src python3 milestones/results/m7_workqueue.py OUT.json      # H200
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
from folovllm.triton_utils.pdl import without_pdl  # noqa: E402
from folovllm.utils import cdiv  # noqa: E402

LAST = gl.constexpr(1 << 20)  # a stage's word: item * 2**21 + LAST when it holds the item's last block; -1: no more items


@gluon.jit
def _load_queue(w_desc, x_desc, z_desc, s_desc, ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, words, Queue, P,
                tiles, items, blocks_per_split, total, last_group, GROUP_SIZE: gl.constexpr, BLOCK_N: gl.constexpr,
                STAGES: gl.constexpr, PACK: gl.constexpr):  # fmt: skip
    """The loader warp: take items until none is left; per block, the stage's word says which item it belongs to
    (written before the barrier's arrive, which releases it to the compute warps). Then a last stage says stop."""
    one: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    i = 0
    item = gl.atomic_add(Queue, 1)
    while item < items:
        tile = item % tiles
        first = (item // tiles) * blocks_per_split
        count = gl.minimum(first + blocks_per_split, total) - first
        for j in range(count):
            s = i % STAGES
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
            word = item * (2 * LAST) + (j == count - 1).to(gl.int32) * LAST
            words.index(s).store(gl.full([1], 0, gl.int32, one) + word)
            ws.load_block(w_desc, x_desc, z_desc, s_desc, ready.index(s), w_bufs, x_bufs, z_bufs, s_bufs, s, first + j,
                          tile * BLOCK_N, last_group, GROUP_SIZE, PACK)  # fmt: skip
            i += 1
        item = gl.atomic_add(Queue, 1)
    s = i % STAGES
    mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
    words.index(s).store(gl.full([1], -1, gl.int32, one))
    mbarrier.arrive(ready.index(s), count=1)
    done = gl.atomic_add(Queue + 1, 1)
    if done == P - 1:  # every program has taken its last item: reset for the next launch
        gl.atomic_xchg(Queue, 0)
        gl.atomic_xchg(Queue + 1, 0)


@gluon.jit
def _stage_word(ready, words, i, STAGES: gl.constexpr, layout: gl.constexpr):
    s = i % STAGES
    mbarrier.wait(ready.index(s), (i // STAGES) & 1)
    return gl.max(words.index(s).load(layout), axis=0)


@gluon.jit
def _compute_queue(ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, words, Out, Partials, Counters, M, N, tiles,
                   BLOCK_N: gl.constexpr, SPLIT_K: gl.constexpr, STAGES: gl.constexpr, M_TILE: gl.constexpr):  # fmt: skip
    """The compute warps: each landed block's product (the engine's), and at an item's last block the engine's
    split-K epilogue for that item's tile and split."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, M_TILE, 16])
    four: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    acc = gl.zeros([BLOCK_N, M_TILE], gl.float32, mma)
    i = 0
    word = _stage_word(ready, words, 0, STAGES, four)
    while word >= 0:
        acc += ws.block_product(w_bufs, x_bufs, z_bufs, s_bufs, empty, i % STAGES, 4, BLOCK_N, False, M_TILE, 4, True)
        if (word & LAST) != 0:
            item = word // (2 * LAST)
            ws.store_tile(acc, Out, Out, Partials, Counters, M, N, item % tiles, item // tiles, False, BLOCK_N, SPLIT_K,
                          4)  # fmt: skip
            acc = gl.zeros([BLOCK_N, M_TILE], gl.float32, mma)
        i += 1
        word = _stage_word(ready, words, i, STAGES, four)
    return (acc,)


@gluon.jit
def workqueue_kernel(w_desc, x_desc, z_desc, s_desc, Out, Partials, Counters, Queue, M, N, K, blocks_per_split,
                     GROUP_SIZE: gl.constexpr, BLOCK_N: gl.constexpr, SPLIT_K: gl.constexpr,
                     STAGES: gl.constexpr):  # fmt: skip
    PACK: gl.constexpr = 8
    M_TILE: gl.constexpr = x_desc.block_type.shape[0]
    tiles = gl.cdiv(N, BLOCK_N)
    total = gl.cdiv(K, ws.ROWS * PACK)
    w_bufs, x_bufs, z_bufs, s_bufs, ready, empty = ws.ring(w_desc, x_desc, z_desc, STAGES, PACK)
    words = gl.allocate_shared_memory(gl.int32, [STAGES, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    # fmt: off
    gl.warp_specialize([
        (_compute_queue, (ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, words, Out, Partials, Counters, M, N, tiles,
                          BLOCK_N, SPLIT_K, STAGES, M_TILE)),
        (_load_queue, (w_desc, x_desc, z_desc, s_desc, ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, words, Queue,
                       gl.num_programs(0), tiles, tiles * SPLIT_K, blocks_per_split, total, (K - 1) // GROUP_SIZE,
                       GROUP_SIZE, BLOCK_N, STAGES, PACK)),
    ], [1], [24])
    # fmt: on


_queues: dict[torch.device, torch.Tensor] = {}


def launch(x: torch.Tensor, layer: dict, tuned, per_sm: int, split_k: int, stages: int = 2) -> torch.Tensor:
    """``x @ W`` through the work queue: ``per_sm`` resident programs per SM, items of the tuned plan's columns and
    ``split_k`` K splits."""
    m, k = x.shape
    n = layer["pairs"].shape[1]
    base = ws.WsPlan(tuned.block_n, split_k, stages, False, tuned.maxnreg or 80, 4, next(t for t in ws.M_TILES if t >= m))
    descs = ws.descriptors(x, layer["pairs"], layer["scales"], layer["zeros"], base)
    out, partials, counters = ws.outputs(x, n, base)
    queue = _queues.get(x.device)
    if queue is None:
        queue = _queues[x.device] = torch.zeros(2, dtype=torch.int32, device=x.device)
    programs = per_sm * torch.cuda.get_device_properties(x.device).multi_processor_count
    programs = min(programs, cdiv(n, base.block_n) * split_k)
    workqueue_kernel[(programs,)](*descs, out, partials, counters, queue, m, n, k, cdiv(cdiv(k, 128), split_k),
                                  GROUP_SIZE=128, BLOCK_N=base.block_n, SPLIT_K=split_k, STAGES=stages, num_warps=4,
                                  maxnreg=base.maxnreg)  # fmt: skip
    return out


def compile_check() -> None:
    from folovllm.triton_utils.offline_compile import compile_for_gpu, ptxas_report

    for split_k, m_tile in ((8, 8), (2, 8), (4, 16)):
        plan = ws.WsPlan(128, split_k, 2, False, 80, 4, m_tile)
        w_l, x_l, z_l = ws._descriptor_layouts(plan)
        z_t = f"tensordesc<fp16[1, 128],{z_l!r}>"
        types = dict(w_desc=f"tensordesc<i32[16, 128],{w_l!r}>", x_desc=f"tensordesc<bf16[{m_tile}, 16],{x_l!r}>",
                     z_desc=z_t, s_desc=z_t, Out="*bf16", Partials="*fp32", Counters="*i32", Queue="*i32", M="i32",
                     N="i32", K="i32", blocks_per_split="i32")  # fmt: skip
        asm = compile_for_gpu(workqueue_kernel, types, dict(GROUP_SIZE=128, BLOCK_N=128, SPLIT_K=split_k, STAGES=2),
                              ("N", "K"), 90, 4, 1, 80)  # fmt: skip
        bars = sorted({line.strip() for line in asm["ptx"].splitlines() if line.strip().startswith(("bar.", "barrier."))})
        print(split_k, m_tile, ptxas_report(asm["ptx"]), asm["shared"], bars)


def main(out: str) -> None:
    def configs(tuned, m: int) -> list[dict]:
        return [{"per_sm": per_sm, "split_k": split_k}
                for per_sm, split_k in itertools.product((2, 3), sorted({tuned.split_k, 2 * tuned.split_k}))]  # fmt: skip

    with without_pdl():
        sweep_variants(out, "m7_workqueue", "workqueue", (1, 16), configs,
                       lambda x, layer, tuned, cfg: launch(x, layer, tuned, **cfg))  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1] == "--compile":
        compile_check()
    else:
        main(sys.argv[1])
