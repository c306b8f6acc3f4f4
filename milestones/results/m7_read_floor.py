"""#15, twenty-first session: how fast could any W4A16 kernel be at 1 and 16 rows, timed as ``bench gptq`` times ours?

For each of Qwen3-8B's projections, beside bf16 ``F.linear`` and our tuned GPTQ kernel, in one process, each timed by
``graph_time_s`` (back to back in one CUDA graph, over copies of the operand that add up to more than the L2 cache):

- ``empty_us``: a one-program kernel that stores one value: what a launch in a graph costs with no work at all;
- ``read_us``: the fastest of several pure-read kernels over exactly the GPTQ layer's bytes (codes, scales and zero
  points as one flat buffer), 16 bytes per load, each program summing its slice into one word: what streaming the
  weights costs with no arithmetic and no products;
- ``ceiling`` = bf16 time / ``read_us``: the speedup over bf16 no kernel can beat on this GPU, measured this way.

    python3 milestones/results/m7_read_floor.py OUT.json     # H200, under a minute
"""

from __future__ import annotations

import json
import sys
from functools import partial

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from folovllm.benchmarks.common import provenance
from folovllm.benchmarks.gptq import QWEN3_8B_SHAPES, random_gptq_layer
from folovllm.benchmarks.hardware import copies_beyond_l2, graph_time_s, measure_copy_bandwidth
from folovllm.model_executor.layers.quantization.ops.gptq_gemm import launch_gptq_gemm, plan_gptq_gemm

BITS, GROUP = 4, 128


@triton.jit
def _empty_kernel(Out):
    tl.store(Out, 1)


@triton.jit
def _read_kernel(Words, Out, numel, BLOCK: tl.constexpr, PER_PROGRAM: tl.constexpr):
    """Program ``p`` sums words ``[p * PER_PROGRAM * BLOCK, (p + 1) * PER_PROGRAM * BLOCK)`` (as int4 vectors of four
    words, one 16-byte load each) and stores the sum: the loads cannot be dropped, the output is negligible."""
    start = tl.program_id(0).to(tl.int64) * PER_PROGRAM * BLOCK
    acc = tl.zeros([BLOCK // 4, 4], tl.int32)
    offs = tl.arange(0, BLOCK // 4)[:, None] * 4 + tl.arange(0, 4)[None, :]
    for i in tl.range(PER_PROGRAM):
        idx = start + i * BLOCK + offs
        acc += tl.load(Words + idx, mask=idx < numel, other=0)
    tl.store(Out + tl.program_id(0), tl.sum(tl.sum(acc, 1), 0))


def read_fns(buffers: list[torch.Tensor], out: torch.Tensor, block: int, per_program: int, warps: int) -> list:
    numel = buffers[0].numel()
    grid = (triton.cdiv(numel, block * per_program),)
    return [partial(_read_kernel[grid], b, out, numel, BLOCK=block, PER_PROGRAM=per_program, num_warps=warps)
            for b in buffers]  # fmt: skip


def main(out_path: str) -> None:
    device = torch.device("cuda")
    rows = []
    sink = torch.zeros(1 << 20, dtype=torch.int32, device=device)
    empty_us = graph_time_s([partial(_empty_kernel[(1,)], sink)] * 16, device) * 1e6
    for name, (k, n) in QWEN3_8B_SHAPES.items():
        layer = random_gptq_layer(k, n, BITS, GROUP, False, device, torch.bfloat16)
        gptq_bytes = sum(t.numel() * t.element_size() for t in layer.values() if t is not None)
        copies = copies_beyond_l2(gptq_bytes, device)
        layers = [layer] + [random_gptq_layer(k, n, BITS, GROUP, False, device, torch.bfloat16, seed=i)
                            for i in range(1, copies)]  # fmt: skip
        flats = [torch.randint(0, 1 << 30, (gptq_bytes // 4,), dtype=torch.int32, device=device) for _ in range(copies)]
        dense = [torch.randn(n, k, dtype=torch.bfloat16, device=device) * 0.02
                 for _ in range(copies_beyond_l2(k * n * 2, device))]  # fmt: skip
        reads = []
        for block, per_program, warps in [(b, p, w) for b in (1024, 2048, 4096) for p in (1, 2, 4, 8) for w in (4, 8)]:
            us = graph_time_s(read_fns(flats, sink, block, per_program, warps), device) * 1e6
            reads.append({"block": block, "per_program": per_program, "num_warps": warps, "us": us})
        best = min(reads, key=lambda r: r["us"])
        row = {"layer": name, "k": k, "n": n, "gptq_bytes": gptq_bytes, "bf16_bytes": k * n * 2,
               "empty_us": empty_us, "read_us": best["us"], "read_best": best, "reads": reads,
               "read_GBps": gptq_bytes / best["us"] / 1e3}  # fmt: skip
        for m in (1, 16):
            x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
            bf16_us = graph_time_s([partial(F.linear, x, w) for w in dense], device) * 1e6
            plan = plan_gptq_gemm(m, n, k, BITS, device)
            fns = [partial(launch_gptq_gemm, x, lay["qweight"], lay["scales"], lay["zeros"], None, None, BITS, GROUP)
                   for lay in layers]  # fmt: skip
            gptq_us = graph_time_s(fns, device) * 1e6
            row[f"m{m}"] = {"bf16_us": bf16_us, "gptq_us": gptq_us, "speedup": bf16_us / gptq_us,
                            "ceiling": bf16_us / best["us"], "plan": plan.__dict__}  # fmt: skip
        rows.append(row)
        print(name, f"empty {empty_us:.2f} read {best['us']:.2f} us ({row['read_GBps']:.0f} GB/s)",
              {m: {k2: round(v, 2) for k2, v in row[m].items() if k2 != "plan"} for m in ("m1", "m16")})  # fmt: skip
        del layers, flats, dense
        torch.cuda.empty_cache()
    result = {"benchmark": "m7_read_floor", **provenance(device, "qwen3-8b shapes", torch.bfloat16),
              "bits": BITS, "group_size": GROUP, "copy_GBps": measure_copy_bandwidth(device), "rows": rows}  # fmt: skip
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[-1])
