"""#15, twenty-fourth session: does programmatic dependent launch (PDL) let a projection stream its weights while the
kernel before it still runs, inside a CUDA graph?

The twenty-third session's clocks put a third to a half of a projection's time at one row into fixed costs around
its stream (about 1.9 µs before the first block lands, the slowest program 1.6 µs after the median, the launch gap).
PDL (``triton_utils.pdl``) overlaps exactly those with the kernel before. The nineteenth session judged it on TPOT
alone and never saw whether the kernels overlapped. This probe measures, at M = 1 on Qwen3-8B's shapes, with and
without PDL in one process:

1. each projection alone, launched back to back over copies of its weights (``bench gptq``'s timing), beside bf16;
2. a decoder layer's chain (RMSNorm, qkv, o, RMSNorm with the residual, gate_up, SiLU-and-mul, down; attention left
   out) over 8 copies of the layer's weights, beside the same chain in bf16 (cuBLAS);
3. the kernels of one replay of each chain under ``torch.profiler``: each kernel's start minus the end of the one
   before (negative: they overlapped).

Outputs are checked against the chain without PDL, bit for bit. ``--tpot`` then adds batch-1 decode of
``random:qwen3-8b``: bf16 (M4), GPTQ (M7) with PDL, without (engine built and run inside ``without_pdl``), and with
again (the process's history moved decode graphs' gaps before: twentieth session).

    PYTHONPATH=src python3 milestones/results/m7_pdl_chain.py OUT.json [--tpot]   # H200
    PYTHONPATH=src python3 milestones/results/m7_pdl_chain.py OUT.json --tpot-only   # without PDL first
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from m7_decode_limits import random_layer, reference, rel_err, weight_copies  # noqa: E402
from m7_gaps import kernels_after_previous  # noqa: E402

from folovllm.benchmarks.common import provenance, save_json  # noqa: E402
from folovllm.benchmarks.gptq import QWEN3_8B_SHAPES  # noqa: E402
from folovllm.benchmarks.hardware import graph_time_s  # noqa: E402
from folovllm.model_executor.layers.ops.activation import silu_and_mul  # noqa: E402
from folovllm.model_executor.layers.ops.rms_norm import rms_norm  # noqa: E402
from folovllm.model_executor.layers.quantization.ops import gptq_gemm as ops  # noqa: E402
from folovllm.triton_utils.pdl import without_pdl  # noqa: E402

LAYERS = 8
HIDDEN = 4096


def gptq(x: torch.Tensor, layer: dict[str, torch.Tensor]) -> torch.Tensor:
    return ops.launch_gptq_gemm(x, layer["pairs"], layer["scales"], layer["zeros"], None, None, 4, 128)


def layer_chain(x: torch.Tensor, residual: torch.Tensor, layer: dict, matmul: Callable) -> torch.Tensor:
    """A decoder layer's kernels at one token, attention left out (o_proj reads q's columns of qkv's output)."""
    h, _ = rms_norm(x, layer["norm1"], 1e-6, residual)
    qkv = matmul(h, layer["qkv_proj"])
    o = matmul(qkv[:, :HIDDEN], layer["o_proj"])
    h, _ = rms_norm(o, layer["norm2"], 1e-6, residual)
    act = silu_and_mul(matmul(h, layer["gate_up_proj"]))
    return matmul(act, layer["down_proj"])


def kernel_overlaps(fn: Callable[[], object]) -> list[dict]:
    """One replay of ``fn``'s graph under the profiler: per kernel, its name, duration and its start minus the latest
    end before it (µs; negative: it started while the kernel before still ran)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    return [{"name": e.name[:40], "us": e.time_range.elapsed_us(), "after_previous_us": after}
            for e, after in kernels_after_previous(prof)]  # fmt: skip


def overlap_summary(rows: list[dict]) -> dict:
    """Median start-after-previous per kernel name (skipping the first kernel)."""
    by_name: dict[str, list[float]] = {}
    for r in rows[1:]:
        by_name.setdefault(r["name"], []).append(r["after_previous_us"])
    return {name: {"count": len(v), "median_after_previous_us": statistics.median(v), "min": min(v), "max": max(v)}
            for name, v in by_name.items()}  # fmt: skip


def projections(dev: torch.device) -> list[dict]:
    """Each projection back to back over copies of its weights, with and without PDL, beside bf16."""
    rows = []
    for name, (k, n) in QWEN3_8B_SHAPES.items():
        layers, dense = weight_copies(k, n, dev)
        x = torch.randn(1, k, dtype=torch.bfloat16, device=dev)
        bf16_us = graph_time_s([partial(F.linear, x, w) for w in dense], dev) * 1e6
        err = rel_err(gptq(x, layers[0]), reference(x, layers[0]))
        fns = [partial(gptq, x, layer) for layer in layers]
        pdl_us = graph_time_s(fns, dev) * 1e6
        with without_pdl():
            plain_us = graph_time_s(fns, dev) * 1e6
        pdl_again_us = graph_time_s(fns, dev) * 1e6
        overlaps = overlap_summary(kernel_overlaps(lambda: [fn() for fn in fns]))
        with without_pdl():
            plain_overlaps = overlap_summary(kernel_overlaps(lambda: [fn() for fn in fns]))
        row = {"layer": name, "k": k, "n": n, "copies": len(layers), "err": err, "bf16_us": bf16_us,
               "pdl_us": pdl_us, "pdl_again_us": pdl_again_us, "plain_us": plain_us,
               "pdl_vs_bf16": bf16_us / pdl_us, "plain_vs_bf16": bf16_us / plain_us, "overlaps_pdl": overlaps,
               "overlaps_plain": plain_overlaps}  # fmt: skip
        print({key: v for key, v in row.items() if not key.startswith("overlaps")}, overlaps, plain_overlaps, flush=True)
        rows.append(row)
        del layers, dense
        torch.cuda.empty_cache()
    return rows


def chains(dev: torch.device) -> dict:
    """The layer chain over ``LAYERS`` copies: GPTQ with and without PDL, bf16; per-layer time, outputs compared."""
    gen = torch.Generator(device=dev).manual_seed(0)
    layers, dense = [], []
    for i in range(LAYERS):
        norms = {key: torch.rand(HIDDEN, device=dev, generator=gen).bfloat16() + 0.5 for key in ("norm1", "norm2")}
        quant = {name: random_layer(k, n, dev, seed=100 * i + j) for j, (name, (k, n)) in enumerate(QWEN3_8B_SHAPES.items())}
        for q in quant.values():
            del q["adjacent"], q["codes"]
        layers.append(norms | quant)
        dense.append(norms | {name: torch.randn(n, k, dtype=torch.bfloat16, device=dev, generator=gen) * 0.02
                              for name, (k, n) in QWEN3_8B_SHAPES.items()})  # fmt: skip
    x0 = torch.randn(1, HIDDEN, dtype=torch.bfloat16, device=dev)
    residual = torch.zeros_like(x0)

    def run(stack: list[dict], matmul: Callable) -> torch.Tensor:
        residual.zero_()
        x = x0
        for layer in stack:
            x = layer_chain(x, residual, layer, matmul)
        return x

    def chain_fn(stack: list[dict], matmul: Callable) -> Callable[[], torch.Tensor]:
        return lambda: run(stack, matmul)

    gptq_chain, bf16_chain = chain_fn(layers, gptq), chain_fn(dense, F.linear)
    with without_pdl():
        want = gptq_chain().clone()
        plain_us = graph_time_s([gptq_chain], dev) * 1e6 / LAYERS
        plain_rows = kernel_overlaps(gptq_chain)
    got = gptq_chain().clone()
    pdl_us = graph_time_s([gptq_chain], dev) * 1e6 / LAYERS
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gptq_chain()
    graph.replay()
    torch.cuda.synchronize()
    pdl_rows = kernel_overlaps(gptq_chain)
    bf16_us = graph_time_s([bf16_chain], dev) * 1e6 / LAYERS
    with without_pdl():
        bf16_plain_us = graph_time_s([bf16_chain], dev) * 1e6 / LAYERS
    result = {"layers": LAYERS, "eager_pdl_equal": bool(torch.equal(got, want)),
              "graph_pdl_equal": bool(torch.equal(out, want)), "gptq_pdl_us_per_layer": pdl_us,
              "gptq_plain_us_per_layer": plain_us, "bf16_us_per_layer": bf16_us,
              "bf16_plain_us_per_layer": bf16_plain_us, "pdl_vs_plain": plain_us / pdl_us,
              "gptq_pdl_vs_bf16": bf16_us / pdl_us, "gptq_plain_vs_bf16": bf16_us / plain_us,
              "overlaps_pdl": overlap_summary(pdl_rows), "overlaps_plain": overlap_summary(plain_rows),
              "first_layer_pdl": pdl_rows[:8], "first_layer_plain": plain_rows[:8]}  # fmt: skip
    print(result, flush=True)
    return result


def tpot(pdl_first: bool = True) -> list[dict]:
    """Batch-1 TPOT, 128 prompt and 128 output tokens: bf16 (M4), then GPTQ with PDL, without and with again (or
    without, with and without again)."""
    from contextlib import nullcontext

    from folovllm.benchmarks.gptq import tpot_row

    gptq = {"milestone": "M7", "quantization": "gptq"}
    on, off = ("gptq", gptq, nullcontext), ("gptq-no-pdl", gptq, without_pdl)
    first, second = (on, off) if pdl_first else (off, on)
    rows = []
    for label, kwargs, context in (("bf16", {"milestone": "M4"}, nullcontext), first, second, first):
        with context():
            rows.append(tpot_row(label, "random:qwen3-8b", 128, 128, **kwargs))
        print(rows[-1], flush=True)
    for row in rows:
        row["tpot_speedup_vs_bf16"] = rows[0]["tpot_s"] / row["tpot_s"]
    return rows


def main(out: str, with_tpot: bool = False) -> None:
    dev = torch.device("cuda")
    result = provenance(dev, "random 4-bit layers, Qwen3-8B shapes, M = 1", torch.bfloat16) | {"benchmark": "m7_pdl_chain"}
    result["chain"] = chains(dev)
    save_json(out, result)
    torch.cuda.empty_cache()
    result["projections"] = projections(dev)
    save_json(out, result)
    if with_tpot:
        result["tpot"] = tpot()
        save_json(out, result)


if __name__ == "__main__":
    if "--tpot-only" in sys.argv[2:]:  # TPOT alone, the engine without PDL first
        save_json(sys.argv[1], provenance(torch.device("cuda"), "random:qwen3-8b", torch.bfloat16)
                  | {"benchmark": "m7_pdl_chain --tpot-only", "tpot": tpot(pdl_first=False)})  # fmt: skip
    else:
        main(sys.argv[1], "--tpot" in sys.argv[2:])
