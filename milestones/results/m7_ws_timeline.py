"""#15, twenty-third session: when each program of the Gluon decode kernel waits, from clocks read inside it.

The twins say the small projections' loads and products hardly overlap, and longer runs (stream-K) did not help. This
reads the SM's cycle counter (``%clock64``) inside the tuned plan's programs at M = 1: at the start, after each ring
stage lands (the compute warps' wait), after the last product and after the epilogue (``store_tile``), with the SM it
ran on (``%smid``). Programs on one SM share that counter, so their phases line up. The kernel is the engine's
(``ring``, ``_load_partition``, ``block_product``, ``store_tile``) with the compute loop reading the clock; it is timed
beside the engine's launch and checked against the reference.

    PYTHONPATH=src python3 milestones/results/m7_ws_timeline.py --compile   # CPU: compile for sm_90
    PYTHONPATH=src python3 milestones/results/m7_ws_timeline.py OUT.json    # H200
    PYTHONPATH=src python3 milestones/results/m7_ws_timeline.py --stages OUT.json   # each plan at 1, 2 and 4 stages
    PYTHONPATH=src python3 milestones/results/m7_ws_timeline.py --raw OUT.json   # and each program's SM, start, end
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
from functools import partial

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from m7_decode_limits import reference, rel_err, weight_copies  # noqa: E402

from folovllm.model_executor.layers.quantization.ops import gluon_gptq as ws  # noqa: E402
from folovllm.model_executor.layers.quantization.ops import gptq_gemm as ops  # noqa: E402
from folovllm.triton_utils.pdl import without_pdl  # noqa: E402
from folovllm.utils import cdiv  # noqa: E402

_SLOTS = 42  # per program: its SM, the start, one per block (up to 36), two global times, after products, after epilogue
_GLOBAL = _SLOTS - 4  # the global timer (ns) at the start and at the end: the SM clock's rate while the kernel ran
SLOTS = gl.constexpr(_SLOTS)


@gluon.jit
def _clock(layout: gl.constexpr):
    """The SM's cycle counter (one value, read by every thread of the partition)."""
    dummy = gl.full([1], 0, gl.int32, layout)
    return gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [dummy], dtype=gl.int64, is_pure=False, pack=1)


@gluon.jit
def _globaltimer(layout: gl.constexpr):
    """The GPU's global timer in ns (one value, read by every thread of the partition)."""
    dummy = gl.full([1], 0, gl.int32, layout)
    return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dummy], dtype=gl.int64, is_pure=False,
                                     pack=1)  # fmt: skip


@gluon.jit
def _smid(layout: gl.constexpr):
    dummy = gl.full([1], 0, gl.int32, layout)
    return gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [dummy], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _timed_compute(ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, count, Times, slot0, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, M_TILE: gl.constexpr):  # fmt: skip
    """The engine's compute partition, reading the clock after each stage lands and after the last product."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, M_TILE, 16])
    one: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    zero = gl.arange(0, 1, layout=one)
    acc = gl.zeros([BLOCK_N, M_TILE], gl.float32, mma)
    for i in range(count):
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        gl.store(Times + slot0 + 2 + i + zero, _clock(one))
        acc += ws.block_product(w_bufs, x_bufs, z_bufs, s_bufs, empty, s, 4, BLOCK_N, False, M_TILE, 4, True)
    gl.store(Times + slot0 + SLOTS - 2 + zero, _clock(one))  # after the last product (each waited for)
    return (acc,)


@gluon.jit
def timeline_kernel(w_desc, x_desc, z_desc, s_desc, Out, Partials, Counters, Times, M, N, K, blocks_per_split,
                    BLOCK_N: gl.constexpr, SPLIT_K: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    PACK: gl.constexpr = 8
    M_TILE: gl.constexpr = x_desc.block_type.shape[0]
    one: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    zero = gl.arange(0, 1, layout=one)
    pid_n = gl.program_id(0)
    split = gl.program_id(1)
    slot0 = (split * gl.num_programs(0) + pid_n) * SLOTS
    gl.store(Times + slot0 + zero, _smid(one).to(gl.int64))
    gl.store(Times + slot0 + SLOTS - 4 + zero, _globaltimer(one))
    gl.store(Times + slot0 + 1 + zero, _clock(one))
    total = gl.cdiv(K, ws.ROWS * PACK)
    first = split * blocks_per_split
    count = gl.maximum(gl.minimum(first + blocks_per_split, total) - first, 0)
    w_bufs, x_bufs, z_bufs, s_bufs, ready, empty = ws.ring(w_desc, x_desc, z_desc, STAGES, PACK)
    # fmt: off
    results = gl.warp_specialize([
        (_timed_compute, (ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, count, Times, slot0, BLOCK_N, STAGES, M_TILE)),
        (ws._load_partition, (w_desc, x_desc, z_desc, s_desc, ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, first,
                              count, pid_n * BLOCK_N, (K - 1) // 128, 128, STAGES, PACK)),
    ], [1], [24])
    # fmt: on
    ws.store_tile(results[0], Out, Out, Partials, Counters, M, N, pid_n, split, False, BLOCK_N, SPLIT_K, 4)
    gl.store(Times + slot0 + SLOTS - 1 + zero, _clock(one))
    gl.store(Times + slot0 + SLOTS - 3 + zero, _globaltimer(one))


def launch(x: torch.Tensor, layer: dict, plan: ws.WsPlan, times: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    n = layer["pairs"].shape[1]
    descs = ws.descriptors(x, layer["pairs"], layer["scales"], layer["zeros"], plan)
    out, partials, counters = ws.outputs(x, n, plan)
    timeline_kernel[(cdiv(n, plan.block_n), plan.split_k)](*descs, out, partials, counters, times, m, n, k,
                                           cdiv(cdiv(k, 128), plan.split_k), BLOCK_N=plan.block_n,
                                           SPLIT_K=plan.split_k, STAGES=plan.stages, num_warps=4,
                                           maxnreg=plan.maxnreg)  # fmt: skip
    return out


def compile_check() -> None:
    from folovllm.triton_utils.offline_compile import compile_for_gpu, ptxas_report

    plan = ws.WsPlan(128, 8, 2, False, 80, 4, 8)
    w_l, x_l, z_l = ws._descriptor_layouts(plan)
    z_t = f"tensordesc<fp16[1, 128],{z_l!r}>"
    types = dict(w_desc=f"tensordesc<i32[16, 128],{w_l!r}>", x_desc=f"tensordesc<bf16[8, 16],{x_l!r}>", z_desc=z_t,
                 s_desc=z_t, Out="*bf16", Partials="*fp32", Counters="*i32", Times="*i64", M="i32", N="i32", K="i32",
                 blocks_per_split="i32")  # fmt: skip
    asm = compile_for_gpu(timeline_kernel, types, dict(BLOCK_N=128, SPLIT_K=8, STAGES=2), ("N", "K"), 90, 4, 1, 80)
    print(ptxas_report(asm["ptx"]), asm["ptx"].count("%clock64"), asm["ptx"].count("%smid"))


def clock_ghz(times: torch.Tensor) -> float | None:
    """The SM clock's rate while the programs ran: median ``%clock64`` cycles per global-timer ns over the programs."""
    t = times.cpu().to(torch.float64)
    cycles, ns = (t[:, _SLOTS - 1] - t[:, 1]).tolist(), (t[:, _GLOBAL + 1] - t[:, _GLOBAL]).tolist()
    ticks = [c / g for c, g in zip(cycles, ns) if g > 0]
    return statistics.median(ticks) if ticks else None


def summarize(times: torch.Tensor, count: int, rate_hz: float) -> dict:
    """Per program (µs at ``rate_hz``): first block's wait, each later block's gap, the last product to the end of the
    epilogue; per SM: how far apart its programs started. From the global timer: the SM clock's rate while the
    programs ran (cycles per ns), the first program's start to the last one's end, and the spread of the starts."""
    t = times.cpu().to(torch.float64)
    us = 1e6 / rate_hz
    start, blocks, after, end = t[:, 1], t[:, 2 : 2 + count], t[:, _SLOTS - 2], t[:, _SLOTS - 1]
    first_wait = ((blocks[:, 0] - start) * us).tolist()
    gaps = ((blocks[:, 1:] - blocks[:, :-1]) * us).flatten().tolist() if count > 1 else []
    last = ((after - blocks[:, -1]) * us).tolist()
    epilogue = ((end - after) * us).tolist()
    total = ((end - start) * us).tolist()
    by_sm: dict[int, list[float]] = {}
    for sm, s0 in zip(t[:, 0].tolist(), start.tolist()):
        by_sm.setdefault(int(sm), []).append(s0)
    spread = [(max(v) - min(v)) * us for v in by_sm.values() if len(v) > 1]
    med = statistics.median
    landed = [med(((blocks[:, i] - start) * us).tolist()) for i in range(count)]
    g0, g1 = t[:, _GLOBAL], t[:, _GLOBAL + 1]
    measured = {"clock_ghz_measured": clock_ghz(times), "global_span_us": (g1.max() - g0.min()).item() / 1e3,
                "global_start_spread_us": (g0.max() - g0.min()).item() / 1e3,
                "global_program_us": med(((g1 - g0) / 1e3).tolist())}  # fmt: skip
    return measured | {"programs": t.shape[0], "programs_per_sm": med([len(v) for v in by_sm.values()]), "landed_us": landed,
            "first_wait_us": med(first_wait), "block_gap_us": med(gaps) if gaps else None, "last_product_us": med(last),
            "epilogue_us": med(epilogue), "program_us": med(total), "program_us_max": max(total),
            "start_spread_on_sm_us": med(spread) if spread else None}  # fmt: skip


def main(out: str, stage_list: tuple[int, ...] = (), raw: bool = False) -> None:
    from folovllm.benchmarks.common import provenance, save_json
    from folovllm.benchmarks.gptq import QWEN3_8B_SHAPES
    from folovllm.benchmarks.hardware import graph_time_s

    dev = torch.device("cuda")
    rate = torch.cuda.get_device_properties(dev).clock_rate * 1e3 if hasattr(torch.cuda.get_device_properties(dev),
                                                                           "clock_rate") else 1.98e9  # fmt: skip
    rows = []
    for name, (k, n) in QWEN3_8B_SHAPES.items():
        layers, _ = weight_copies(k, n, dev)
        x = torch.randn(1, k, dtype=torch.bfloat16, device=dev)
        ref = reference(x, layers[0])
        tuned = ops.as_ws_plan(ops.plan_gptq_gemm(1, n, k, 4, dev, 2), 1)
        for stages in stage_list or (tuned.stages,):
            plan = dataclasses.replace(tuned, stages=stages)
            programs = cdiv(n, plan.block_n) * plan.split_k
            count = cdiv(cdiv(k, 128), plan.split_k)
            times = torch.zeros(programs, _SLOTS, dtype=torch.int64, device=dev)
            err = rel_err(launch(x, layers[0], plan, times), ref)
            with without_pdl():  # the kernel alone, as bench gptq's table times it
                engine_us = graph_time_s(
                    [partial(ws.launch_gptq_decode_ws, x, L["pairs"], L["scales"], L["zeros"], None, 4, 128, plan)
                     for L in layers], dev,
                ) * 1e6  # fmt: skip
            timed_us = graph_time_s([partial(launch, x, L, plan, times) for L in layers], dev) * 1e6
            launch(x, layers[0], plan, times)  # weights not in L2 (the replays read every other copy after it)
            torch.cuda.synchronize()
            ghz = clock_ghz(times)  # µs at the rate the SM ran (the twenty-third session assumed the rated clock)
            hz = ghz * 1e9 if ghz else rate
            row = {"layer": name, "k": k, "n": n, "plan": plan.__dict__, "blocks_per_program": count, "err": err,
                   "engine_us": engine_us, "timed_us": timed_us, "clock_hz": hz}  # fmt: skip
            row |= summarize(times, count, hz)
            if raw:  # per program: its SM, then global-timer start and end (ns after the first start)
                t = times.cpu()
                g0 = t[:, _GLOBAL].min()
                row["programs_raw"] = [[int(p[0]), int(p[_GLOBAL] - g0), int(p[_GLOBAL + 1] - g0)] for p in t]
            print(row, flush=True)
            rows.append(row)
        save_json(out, provenance(dev, "random 4-bit layers, Qwen3-8B shapes", torch.bfloat16)
                  | {"benchmark": "m7_ws_timeline", "rows": rows})  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1] == "--compile":
        compile_check()
    elif sys.argv[1] == "--stages":
        main(sys.argv[2], (1, 2, 4))
    elif sys.argv[1] == "--raw":  # with every program's SM, start and end (grid order: column tile fastest)
        main(sys.argv[2], raw=True)
    else:
        main(sys.argv[1])
