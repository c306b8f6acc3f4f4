"""``folovllm bench gptq``: the W4A16 kernel against a bf16 matmul (cuBLAS) on Qwen3-8B's linear
shapes, the weight memory 4-bit codes save (and the KV blocks that frees), and batch-1 decode
(TPOT) of the whole model, bf16 vs GPTQ.

Decode reads every weight once per step, so a kernel that reads 4-bit codes instead of bf16
weights can be up to ~3.6x faster at small M (codes plus fp16 scales and zeros per group of 128);
at large M both are compute-bound and dequantizing costs extra work: the crossover is measured.
All weights are random (uniform codes, group 128, symmetric, what RTN gives on random weights):
speed and memory do not depend on the values, and quantizing an 8B model here would only cost time.
"""

from __future__ import annotations

import gc
import itertools
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from folovllm.benchmarks.common import LM_HEAD_OVERRIDES, provenance
from folovllm.benchmarks.hardware import copies_beyond_l2, graph_time_s, measure_copy_bandwidth, median_time_s
from folovllm.benchmarks.word_stream import stream_words
from folovllm.model_executor.layers.quantization.ops.gptq_gemm import (
    DECODE_MAX_M,
    GEMV_MAX_M,
    PREFILL_M_TILE,
    WS_MAX_M,
    GemmPlan,
    block_rows,
    gptq_gemm_reference,
    launch_gptq_gemm,
    pack_for_kernel,
    plan_gptq_gemm,
    split_k_for,
    tuned_key,
    write_tuned_plans,
)
from folovllm.triton_utils.pdl import without_pdl
from folovllm.utils import cdiv

# (K, N) of each decoder projection of Qwen3-8B: hidden 4096, 32 q heads + 8 kv heads of 128, MLP 12288.
QWEN3_8B_SHAPES = {
    "qkv_proj": (4096, 6144),
    "o_proj": (4096, 4096),
    "gate_up_proj": (4096, 24576),
    "down_proj": (12288, 4096),
}
LM_HEAD_SHAPE = {"lm_head": (4096, 151936)}  # Qwen3-8B's vocabulary: 4-bit when a checkpoint says ``lm_head: true``
WEIGHTS_NOTE = (
    "random weights: uniform 4-bit codes, symmetric, group 128 (what RTN of random weights gives); "
    "speed and memory do not depend on the values"
)


def random_gptq_layer(
    k: int, n: int, bits: int, group_size: int, act_order: bool, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> dict[str, Any]:
    """Kernel-layout tensors of a random ``K x N`` layer (``perm`` only with act-order)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    groups = cdiv(k, group_size)
    codes = torch.randint(0, 2**bits, (k, n), generator=gen, device=device)
    return {
        "qweight": pack_for_kernel(codes, bits),
        "scales": torch.full((groups, n), 0.002, dtype=dtype, device=device),
        "zeros": torch.full((groups, n), 2 ** (bits - 1), dtype=dtype, device=device),
        "perm": torch.randperm(k, generator=gen, device=device).to(torch.int32) if act_order else None,
    }


def _graph_replay_matches(fn, device: torch.device) -> bool:
    """The launch (split-K counters included) captured in a CUDA graph and replayed twice gives the eager result."""
    expected = fn().clone()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    graph.replay()
    torch.cuda.synchronize(device)
    return bool(torch.equal(out, expected))


class _Operands:
    """Copies of one projection's weights, bf16 and GPTQ, enough of each to stream from HBM as decode does
    (``copies_beyond_l2``); the kernels are timed by ``graph_time_s`` over all copies."""

    def __init__(self, k: int, n: int, bits: int, group_size: int, act_order: bool, device: torch.device,
                 dtype: torch.dtype) -> None:  # fmt: skip
        self.bits, self.group_size, self.device = bits, group_size, device
        first = random_gptq_layer(k, n, bits, group_size, act_order, device, dtype)
        self.gptq_bytes = sum(t.numel() * t.element_size() for t in first.values() if t is not None)
        self.dense_bytes = k * n * torch.finfo(dtype).bits // 8
        on_gpu = device.type == "cuda"
        copies = copies_beyond_l2(self.gptq_bytes, device) if on_gpu else 1
        self.layers = [first] + [random_gptq_layer(k, n, bits, group_size, act_order, device, dtype, seed=i)
                                 for i in range(1, copies)]  # fmt: skip
        gen = torch.Generator(device=device).manual_seed(0)
        dense_copies = copies_beyond_l2(self.dense_bytes, device) if on_gpu else 1
        self.dense = [torch.randn(n, k, dtype=dtype, device=device, generator=gen) * 0.02 for _ in range(dense_copies)]

    def args(self, layer: dict[str, Any]) -> tuple:
        return (layer["qweight"], layer["scales"], layer["zeros"], layer["perm"], None, self.bits, self.group_size)

    def time_dense(self, x: torch.Tensor) -> float:
        if self.device.type != "cuda":
            return median_time_s(lambda: F.linear(x, self.dense[0]), self.device, warmup=1, iters=3)
        return graph_time_s([partial(F.linear, x, w) for w in self.dense], self.device)

    def time_gptq(self, x: torch.Tensor, plan: GemmPlan | None = None) -> float:
        if self.device.type != "cuda":
            return median_time_s(lambda: launch_gptq_gemm(x, *self.args(self.layers[0]), plan=plan), self.device, 1, 3)
        fns = [partial(launch_gptq_gemm, x, *self.args(layer), plan=plan) for layer in self.layers]
        return graph_time_s(fns, self.device)

    def max_rel_err(self, x: torch.Tensor, plan: GemmPlan | None = None) -> float:
        args = self.args(self.layers[0])
        ref = gptq_gemm_reference(x.float(), *args[:4], None, self.bits, self.group_size)
        return ((launch_gptq_gemm(x, *args, plan=plan).float() - ref).abs().max() / ref.abs().max()).item()


@torch.inference_mode()
def bench_gptq_kernel(
    ms: list[int],
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.bfloat16,
    shapes: dict[str, tuple[int, int]] | None = None,
) -> list[dict[str, Any]]:
    """One row per (projection, M): bf16 ``F.linear`` vs the GPTQ kernel (GPU time from CUDA-graph replays
    over weights that do not fit in L2), bytes moved, error vs the reference; ``shapes`` default to Qwen3-8B's
    decoder projections."""
    device = device or torch.device("cuda")
    rows = []
    for name, (k, n) in (shapes or QWEN3_8B_SHAPES).items():
        ops = _Operands(k, n, bits, group_size, act_order, device, dtype)
        for m in ms:
            x = torch.randn(m, k, dtype=dtype, device=device)
            dense_s, gptq_s = ops.time_dense(x), ops.time_gptq(x)
            plan = plan_gptq_gemm(m, n, k, bits, device)
            row = {
                "layer": name,
                "m": m,
                "k": k,
                "n": n,
                "bf16_us": dense_s * 1e6,
                "gptq_us": gptq_s * 1e6,
                "speedup": dense_s / gptq_s,
                "bf16_weight_bytes": ops.dense_bytes,
                "gptq_weight_bytes": ops.gptq_bytes,
                "gptq_weight_GBps": ops.gptq_bytes / gptq_s / 1e9,
                "bf16_weight_GBps": ops.dense_bytes / dense_s / 1e9,
                "gptq_TFLOPs": 2 * m * k * n / gptq_s / 1e12,
                "bf16_TFLOPs": 2 * m * k * n / dense_s / 1e12,
                "max_rel_err_vs_reference": ops.max_rel_err(x),
                "plan": dict(plan.__dict__),
            }
            if plan.gemv and device.type == "cuda":  # the same launch with the arithmetic taken out
                words_s = graph_time_s([partial(stream_words, layer["qweight"], plan) for layer in ops.layers], device)
                qweight_bytes = ops.layers[0]["qweight"].numel() * 4
                row |= {"words_only_us": words_s * 1e6, "words_only_GBps": qweight_bytes / words_s / 1e9}
            if m <= 16 and device.type == "cuda":
                args = ops.args(ops.layers[0])
                row["cuda_graph_replay_equal"] = _graph_replay_matches(lambda: launch_gptq_gemm(x, *args), device)
            rows.append(row)
        del ops
        _free()
    return rows


def sweep_plans(m: int, k: int, n: int, bits: int, num_sms: int, device: torch.device) -> list[GemmPlan]:
    """Launch plans worth timing at ``m`` rows: the default first, then the FMA kernel (``m <= 4``) and
    ``tl.dot`` tiles (plain, with the operands swapped, and swapped with bf16 code pairs), over tile width,
    warps and the programs-per-SM target of the K split; above 16 rows the dequantized-tile plans, and up to 64
    rows the code pairs in one 64-row tile too (a 16-row tile would read the weights once per 16 rows). Up to 16 rows
    also the warp-specialized Gluon kernel (its pairs twin where Gluon does not run) at 3-5 programs per SM
    (``maxnreg`` 80, 64, 48), about one wave of programs: the fastest grids of the seventeenth session's probe;
    from 17 to 64 rows the same kernel with 64 rows per product (``maxnreg`` 96 or 128, 1-3 programs per SM), and
    above 64 rows in tiles of 128 rows (``PREFILL_M_TILE``: the weights read once per 128 rows, X once per 128 or 256
    columns; a program's compute warps raise their registers to 176-256 from the pool ``maxnreg`` sets, so one
    program per SM with eight of them, two with four).

    At one row the FMA kernel's grid reaches further: the 640d064 sweep's fastest plans sat at the edge of
    the first grid (the narrowest tiles, the fewest warps, the most splits it allowed) on every shape."""
    k_blocks = cdiv(k, block_rows(bits))
    plans = [plan_gptq_gemm(m, n, k, bits, device)]
    if m > DECODE_MAX_M:  # prefill: tiles of dequantized weights, sliced or whole blocks; no K split
        for block_m in (64,) if m <= 64 else (64, 128):
            for block_n in (64, 128, 256):
                for warps in (4, 8):
                    for stages in (3, 4):
                        for block_dot in (False, True):
                            plans.append(GemmPlan(block_m, block_n, True, 1, k_blocks, warps, stages, block_dot=block_dot))
        if m <= 64:  # still bound by the weight stream: the bf16 code pairs with all rows in one 64-wide tile
            for block_n, warps in ((64, 4), (128, 8)):
                for per_sm in (2, 8):
                    split, per_split = split_k_for(cdiv(n, block_n), k_blocks, per_sm * num_sms)
                    plans.append(GemmPlan(64, block_n, False, split, per_split, warps, 4, swap_ab=True, pairs=True))
            # Gluon with 64 rows per product: 64 columns per warpgroup fit 96-128 registers without spilling
            for (block_n, warps), maxnreg, per_sm in itertools.product(((64, 4), (128, 8)), (96, 128), (1, 2, 3)):
                if warps == 8 and maxnreg < 128:  # two warpgroups at 96 registers spill (compiled for sm_90)
                    continue
                split, per_split = split_k_for(cdiv(n, block_n), k_blocks, per_sm * num_sms, 2)
                plans.append(GemmPlan(WS_MAX_M, block_n, False, split, per_split, warps, 4, swap_ab=True, pairs=True,
                                      ws=True, maxnreg=maxnreg))  # fmt: skip
        else:  # Gluon in tiles of 128 rows, scaled operands: (columns, warps, register pool) for one or two per SM
            for (block_n, warps, maxnreg), stages in itertools.product(
                ((128, 8, 128), (128, 8, 168), (256, 8, 128), (256, 8, 168), (128, 4, 128)), (2, 3, 4)
            ):
                plans.append(GemmPlan(PREFILL_M_TILE, block_n, False, 1, k_blocks, warps, stages, swap_ab=True,
                                      pairs=True, ws=True, maxnreg=maxnreg))  # fmt: skip
        return list(dict.fromkeys(plans))
    for gemv in (True, False) if m <= GEMV_MAX_M else (False,):
        block_m = 1 if gemv else 16  # the FMA kernel runs one row of X per program
        wide = gemv and m == 1
        for block_n in (32, 64, 128, 256) if wide else (64, 128, 256):
            for warps in (2, 4, 8) if wide else (4, 8):
                for per_sm in (2, 8, 32) if wide else (2, 8):
                    for min_blocks in (1, 4) if wide else (4,):
                        split, per_split = split_k_for(cdiv(n, block_n), k_blocks, per_sm * num_sms, min_blocks)
                        for swap_ab, pairs in ((False, False),) if gemv else ((False, False), (True, False), (True, True)):
                            plans.append(GemmPlan(block_m, block_n, False, split, per_split, warps, 4, gemv, swap_ab,
                                                  pairs=pairs))  # fmt: skip
    for block_n, maxnreg, per_sm in itertools.product((64, 128), (80, 64, 48), (2, 3, 4)):
        split, per_split = split_k_for(cdiv(n, block_n), k_blocks, per_sm * num_sms, 2)
        plans.append(GemmPlan(DECODE_MAX_M, block_n, False, split, per_split, 4, 4, swap_ab=True, pairs=True, ws=True,
                              maxnreg=maxnreg))  # fmt: skip
    return list(dict.fromkeys(plans))  # targets that give the same split are one plan


@torch.inference_mode()
def bench_gptq_sweep(ms: list[int], bits: int = 4, group_size: int = 128, device: torch.device | None = None,
                     dtype: torch.dtype = torch.bfloat16,
                     shapes: dict[str, tuple[int, int]] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Every plan of ``sweep_plans`` on every shape (default: Qwen3-8B's decoder projections), timed as
    ``bench_gptq_kernel`` times: the data the tuned plans (``write_tuned_plans``) come from."""
    device = device or torch.device("cuda")
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    rows = []
    for name, (k, n) in (shapes or QWEN3_8B_SHAPES).items():
        ops = _Operands(k, n, bits, group_size, False, device, dtype)
        for m in ms:
            x = torch.randn(m, k, dtype=dtype, device=device)
            bf16_s = ops.time_dense(x)
            for plan in sweep_plans(m, k, n, bits, num_sms, device):
                try:
                    err = ops.max_rel_err(x, plan)
                    gptq_s = ops.time_gptq(x, plan)
                except Exception as exc:  # a tile that does not fit in shared memory or registers
                    rows.append(
                        {"layer": name, "k": k, "n": n, "m": m, "plan": dict(plan.__dict__), "error": str(exc)[:200]}
                    )
                    continue
                rows.append({"layer": name, "k": k, "n": n, "m": m, "plan": dict(plan.__dict__), "gptq_us": gptq_s * 1e6,
                             "bf16_us": bf16_s * 1e6, "speedup": bf16_s / gptq_s, "max_rel_err": err})  # fmt: skip
        del ops
        _free()
    return rows


def best_plans(sweep: list[dict[str, Any]], bits: int = 4) -> dict[str, dict[str, Any]]:
    """The fastest correct plan per (bits, M, K, N) of a sweep, keyed as ``plan_gptq_gemm`` looks them up."""
    best: dict[str, dict[str, Any]] = {}
    for row in sweep:
        if "error" in row or row["max_rel_err"] > 1e-2:
            continue
        key = tuned_key(bits, row["m"], row["k"], row["n"])
        if key not in best or row["gptq_us"] < best[key]["gptq_us"]:
            best[key] = {"gptq_us": row["gptq_us"], "plan": row["plan"]}
    return {key: value["plan"] for key, value in sorted(best.items())}


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def bench_weight_memory(model: str, device: torch.device, dtype: str = "bfloat16") -> dict[str, Any]:
    """Weight bytes of ``model`` in bf16 and as GPTQ (all parameters, and the decoder projections alone),
    device memory each load took, and the KV blocks the difference would hold."""
    from folovllm.config import ModelConfig
    from folovllm.model_executor.model_loader import load_model

    out: dict[str, Any] = {}
    for label, quant in (("bf16", None), ("gptq", "gptq")):
        _free()
        before = _allocated(device)
        loaded = load_model(ModelConfig(model=model, device=device, dtype=dtype, quantization=quant))
        params = dict(loaded.model.named_parameters())
        linear = {
            n: p
            for n, p in params.items()
            if ".layers." in n and any(proj in n for proj in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
        }
        out[label] = {
            "weight_bytes": sum(p.numel() * p.element_size() for p in params.values()),
            "decoder_linear_bytes": sum(p.numel() * p.element_size() for p in linear.values()),
            "allocated_bytes": _allocated(device) - before,
        }
        cfg = loaded.hf_config
        del loaded, params, linear
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    block_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2 * 16  # K and V, bf16, 16 tokens
    saved = out["bf16"]["weight_bytes"] - out["gptq"]["weight_bytes"]
    _free()
    return {
        **out,
        "ratio_all_weights": out["bf16"]["weight_bytes"] / out["gptq"]["weight_bytes"],
        "ratio_decoder_linears": out["bf16"]["decoder_linear_bytes"] / out["gptq"]["decoder_linear_bytes"],
        "saved_bytes": saved,
        "kv_block_bytes_16_tokens": block_bytes,
        "kv_blocks_freed": saved // block_bytes,
        "kv_tokens_freed": saved // block_bytes * 16,
    }


def tpot_row(label: str, model: str, input_len: int, output_len: int, device: str | None = None,
             kv_cache_memory: int = 4 * 2**30, **engine_kwargs: Any) -> dict[str, Any]:  # fmt: skip
    """One batch-1 decode run of the whole model under ``engine_kwargs`` (a preset, ``quantization`` ...), as a row:
    its label, settings, weight bytes, decode floor, TTFT and TPOT."""
    from folovllm.benchmarks.latency import bench_latency

    result = bench_latency(model, [input_len], output_len, 1, device=device, with_hf=False,
                           kv_cache_memory=kv_cache_memory, max_num_seqs=8, **engine_kwargs)  # fmt: skip
    row = {"config": label, **engine_kwargs, "weight_bytes": result["weight_bytes"],
           "decode_floor_s": result["decode_floor_s"], **result["results"][0]["folovllm"]}  # fmt: skip
    _free()
    return row


def bench_gptq_tpot(
    model: str, input_len: int, output_len: int, device: str | None = None, kv_cache_memory: int = 4 * 2**30
) -> list[dict[str, Any]]:
    """Batch-1 decode of the whole model: bf16 (M4, and M7's preset on bf16 weights) vs GPTQ (M7, CUDA graphs;
    with ``lm_head`` 4-bit too) vs GPTQ eager. Ratios are to the first row, M4's."""
    rows = [
        tpot_row(label, model, input_len, output_len, device, kv_cache_memory, **kwargs)
        for label, kwargs in (
            ("bf16", {"milestone": "M4"}),
            ("bf16-m7", {"milestone": "M7"}),  # M5's graph mode, chunked prefill and prefix caching, as GPTQ runs
            ("gptq", {"milestone": "M7", "quantization": "gptq"}),
            ("gptq-lm-head", {"milestone": "M7", "quantization": "gptq", "hf_overrides": LM_HEAD_OVERRIDES}),
            ("gptq-eager", {"milestone": "M7", "quantization": "gptq", "enforce_eager": True}),
        )
    ]
    base = rows[0]["tpot_s"]
    for row in rows:
        row["tpot_speedup_vs_bf16"] = base / row["tpot_s"]
    return rows


def bench_gptq(
    ms: list[int],
    model: str = "random:qwen3-8b",
    input_len: int = 128,
    output_len: int = 128,
    device: str | None = None,
    skip_model: bool = False,
    sweep: bool = False,
    sweep_ms: list[int] | None = None,
    lm_head: bool = False,
) -> dict[str, Any]:
    """Kernels (plain and act-order, launched without PDL), weight memory and TPOT in one JSON; ``sweep`` adds every
    decode plan of ``sweep_plans`` at M = 1, 4, 16 (decode) and 64, 256, 4096 (prefill), or at ``sweep_ms`` only,
    whose tuned plans then replace just their own entries of the table. ``lm_head`` puts ``lm_head``'s shape in
    place of the decoder projections in the kernel table and the sweep (no act-order table)."""
    shapes = LM_HEAD_SHAPE if lm_head else QWEN3_8B_SHAPES
    dev = torch.device(device or "cuda")
    if dev.type != "cuda":
        raise ValueError(f"bench gptq times the Triton kernel against cuBLAS and needs a CUDA device, got {dev}")
    result: dict[str, Any] = {
        "benchmark": "gptq",
        **provenance(dev, model, torch.bfloat16),
        "milestone": "M7",
        "weights": WEIGHTS_NOTE,
        "workload": {
            "kernel_shapes": f"Qwen3-8B {'lm_head' if lm_head else 'decoder projections'} (K, N)",
            "shapes": shapes,
            "ms": ms,
            "bits": 4,
            "group_size": 128,
            "tpot": {"input_len": input_len, "output_len": output_len, "batch_size": 1},
        },
        "copy_GBps": measure_copy_bandwidth(dev),
    }
    with without_pdl():  # kernels alone, as cuBLAS runs: PDL would overlap each launch with its own copy before it
        if sweep:  # first, so that the kernel table below runs the plans it tunes
            result["sweep"] = bench_gptq_sweep(sweep_ms or [1, 4, 16, 64, 256, 4096], device=dev, shapes=shapes)
            source = {key: result[key] for key in ("commit", "date", "gpu")}
            best = best_plans(result["sweep"])
            path = write_tuned_plans(torch.cuda.get_device_name(dev), best, source, merge=sweep_ms is not None)
            result["tuned_plans"] = str(path.relative_to(Path(__file__).parents[1]))
        result["kernel"] = bench_gptq_kernel(ms, device=dev, shapes=shapes)
        if not lm_head:
            result["kernel_act_order"] = bench_gptq_kernel([1, 16, 256], act_order=True, device=dev)
    if not skip_model:
        result["memory"] = bench_weight_memory(model, dev)
        result["tpot"] = bench_gptq_tpot(model, input_len, output_len, device)
    return result
