"""``folovllm bench gemm``: a model's projections at decode batch sizes, cuBLAS against the skinny GEMM.

Each row times ``F.linear`` and the skinny GEMM on one projection's shape from CUDA-graph replays
over weight copies that do not fit in L2 (as a decode step reads them). ``--sweep`` times every plan
of ``sweep_skinny_plans`` and writes the ones at least ``MIN_SPEEDUP`` faster than cuBLAS to this GPU
model's tuned table, which the fast path reads (``Linear.forward_fused``); then batch-1 TPOT of the
whole model is measured with the table and without it (``cublas_only``), in the same process, and with
the table but the norms and SiLU·mul launched separately (``separate_prologues``); ``--tpot`` measures
those three without a sweep.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from folovllm.benchmarks.common import provenance
from folovllm.benchmarks.hardware import copies_beyond_l2, graph_time_s, measure_copy_bandwidth
from folovllm.model_executor.layers.ops import skinny_gemm as sk
from folovllm.model_executor.presets import PRESETS

MIN_SPEEDUP = 1.05  # below this a tuned plan is within run-to-run noise of cuBLAS: keep cuBLAS


def projection_shapes(preset: str) -> dict[str, tuple[int, int]]:
    """``name -> (K, N)`` of one decoder layer's four projections and the LM head of a ``random:`` preset."""
    if preset not in PRESETS:
        raise ValueError(f"model must be random:<preset> with a preset in {sorted(PRESETS)}, got random:{preset}")
    c = PRESETS[preset]
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim", hidden // heads)
    kv = c.get("num_key_value_heads", heads)
    return {
        "qkv_proj": (hidden, (heads + 2 * kv) * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_up_proj": (hidden, 2 * c["intermediate_size"]),
        "down_proj": (c["intermediate_size"], hidden),
        "lm_head": (hidden, c["vocab_size"]),
    }


def best_plans(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per (K, N) the fastest plan of a sweep at one row (the only row count the fast path tunes, see
    ``plan_skinny_gemm``), if it beats cuBLAS by ``MIN_SPEEDUP`` with a sound result."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["m"] != 1 or "error" in row or row["max_rel_err"] > 2e-2 or row["speedup"] < MIN_SPEEDUP:
            continue
        key = sk.tuned_key(row["m"], row["k"], row["n"])
        if key not in best or row["skinny_us"] < best[key]["skinny_us"]:
            best[key] = row
    return {key: row["plan"] for key, row in sorted(best.items())}


def _time_shape(name: str, k: int, n: int, ms: list[int], sweep: bool, dev: torch.device) -> list[dict[str, Any]]:
    gen = torch.Generator(device=dev).manual_seed(0)
    weight_bytes = k * n * 2
    weights = [torch.randn(n, k, generator=gen, device=dev, dtype=torch.bfloat16) * 0.02
               for _ in range(copies_beyond_l2(weight_bytes, dev))]  # fmt: skip
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=gen, device=dev, dtype=torch.bfloat16)
        cublas_s = graph_time_s([partial(F.linear, x, w) for w in weights], dev)
        ref = F.linear(x.float(), weights[0].float())
        tuned = sk.plan_skinny_gemm(m, k, n, torch.bfloat16, dev)
        plans = sk.sweep_skinny_plans(k) if sweep else [tuned] if tuned else []
        for plan in plans:
            row = {"layer": name, "m": m, "k": k, "n": n, "weight_bytes": weight_bytes, "plan": dict(plan.__dict__)}
            try:
                err = (sk.skinny_gemm(x, weights[0], None, plan).float() - ref).abs().max() / ref.abs().max()
                skinny_s = graph_time_s([partial(sk.skinny_gemm, x, w, None, plan) for w in weights], dev)
            except Exception as exc:  # a tile that does not fit in registers
                rows.append(row | {"error": str(exc)[:200]})
                continue
            rows.append(row | {
                "cublas_us": cublas_s * 1e6, "skinny_us": skinny_s * 1e6, "speedup": cublas_s / skinny_s,
                "cublas_GBps": weight_bytes / cublas_s / 1e9, "skinny_GBps": weight_bytes / skinny_s / 1e9,
                "max_rel_err": err.item(),
            })  # fmt: skip
        if not plans:
            rows.append({"layer": name, "m": m, "k": k, "n": n, "weight_bytes": weight_bytes, "plan": None,
                         "cublas_us": cublas_s * 1e6, "cublas_GBps": weight_bytes / cublas_s / 1e9})  # fmt: skip
    return rows


_TPOT_ARMS = {"cublas": sk.cublas_only, "tuned": sk.separate_prologues, "fused": nullcontext}


def _tpot(model: str, input_len: int, output_len: int) -> list[dict[str, Any]]:
    """Batch-1 decode under M4, one process: cuBLAS everywhere; the tuned skinny GEMMs with the norms and
    SiLU·mul launched on their own; and with those fused into the GEMMs' prologues (the M4 preset)."""
    from folovllm.benchmarks.latency import bench_latency

    rows = []
    for label, arm in _TPOT_ARMS.items():
        run = partial(bench_latency, model, [input_len], output_len, 1, with_hf=False, milestone="M4",
                      kv_cache_memory=4 * 2**30, max_num_seqs=8)  # fmt: skip
        with arm():
            result = run()
        rows.append({"config": label, "decode_floor_s": result["decode_floor_s"], **result["results"][0]["folovllm"]})
    for row in rows[1:]:
        row["tpot_speedup_vs_cublas"] = rows[0]["tpot_s"] / row["tpot_s"]
    return rows


@torch.inference_mode()
def bench_gemm(model: str, ms: list[int], device: str | None = None, sweep: bool = False,
               input_len: int = 128, output_len: int = 128, tpot: bool = False) -> dict[str, Any]:  # fmt: skip
    """Rows per (projection, M, plan); with ``sweep`` the tuned table is (re)written; with ``sweep`` or
    ``tpot`` batch-1 TPOT is measured in three arms (``_tpot``)."""
    if not ms or any(not 1 <= m <= sk.SKINNY_MAX_M for m in ms):
        raise ValueError(f"m must be row counts in [1, {sk.SKINNY_MAX_M}] (the skinny GEMM's range), got {ms}")
    dev = torch.device(device or "cuda")
    if dev.type != "cuda":
        raise ValueError(f"bench gemm times Triton against cuBLAS and needs a CUDA device, got {dev}")
    shapes = projection_shapes(model.removeprefix("random:"))
    result: dict[str, Any] = {
        "benchmark": "gemm",
        **provenance(dev, model, torch.bfloat16),
        "workload": {"ms": ms, "shapes": shapes, "sweep": sweep},
        "copy_GBps": measure_copy_bandwidth(dev),
        "results": [row for name, (k, n) in shapes.items() for row in _time_shape(name, k, n, ms, sweep, dev)],
    }
    if sweep:
        source = {key: result[key] for key in ("commit", "date", "gpu", "model")}
        plans = best_plans(result["results"])
        path = sk.write_tuned_plans(torch.cuda.get_device_name(dev), plans, source)
        result["tuned_plans"] = {"path": str(path.relative_to(Path(__file__).parents[1])), "plans": plans}
    if sweep or tpot:
        result["tpot"] = _tpot(model, input_len, output_len)
    return result
