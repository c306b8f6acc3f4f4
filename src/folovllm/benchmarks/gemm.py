"""``folovllm bench gemm``: a model's projections at decode batch sizes, cuBLAS against the skinny GEMM.

Each row times ``F.linear`` and ``skinny_gemm`` on one projection's shape from
CUDA-graph replays over weight copies that do not fit in L2 (as a decode step
reads them), and says which one the fast path takes for it (``Linear.forward_fused``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from folovllm.benchmarks.common import provenance
from folovllm.benchmarks.hardware import copies_beyond_l2, graph_time_s, measure_copy_bandwidth, median_time_s
from folovllm.model_executor.layers.ops.skinny_gemm import SKINNY_MAX_M, skinny_gemm, uses_skinny_gemm
from folovllm.model_executor.presets import PRESETS


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


@torch.inference_mode()
def bench_gemm(model: str, ms: list[int], device: str | None = None, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """One row per (projection, M): GPU time and weight GB/s of both kernels, the error between them."""
    if not ms or any(not 1 <= m <= SKINNY_MAX_M for m in ms):
        raise ValueError(f"m must be row counts in [1, {SKINNY_MAX_M}] (the skinny GEMM's range), got {ms}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda":
        dtype = torch.float32
    rows = []
    for name, (k, n) in projection_shapes(model.removeprefix("random:")).items():
        gen = torch.Generator(device=dev).manual_seed(0)
        weight_bytes = k * n * torch.finfo(dtype).bits // 8
        copies = copies_beyond_l2(weight_bytes, dev) if dev.type == "cuda" else 1
        weights = [torch.randn(n, k, generator=gen, device=dev, dtype=dtype) * 0.02 for _ in range(copies)]
        for m in ms:
            x = torch.randn(m, k, generator=gen, device=dev, dtype=dtype)
            if dev.type == "cuda":
                dense_s = graph_time_s([partial(F.linear, x, w) for w in weights], dev)
                skinny_s = graph_time_s([partial(skinny_gemm, x, w) for w in weights], dev)
            else:
                dense_s = median_time_s(partial(F.linear, x, weights[0]), dev, warmup=1, iters=3)
                skinny_s = median_time_s(partial(skinny_gemm, x, weights[0]), dev, warmup=1, iters=3)
            ref = F.linear(x.float(), weights[0].float())
            err = (skinny_gemm(x, weights[0]).float() - ref).abs().max() / ref.abs().max()
            rows.append({
                "layer": name, "m": m, "k": k, "n": n, "weight_bytes": weight_bytes,
                "cublas_us": dense_s * 1e6, "skinny_us": skinny_s * 1e6, "speedup": dense_s / skinny_s,
                "cublas_GBps": weight_bytes / dense_s / 1e9, "skinny_GBps": weight_bytes / skinny_s / 1e9,
                "max_rel_err_vs_fp32": err.item(), "fast_path_uses_skinny": uses_skinny_gemm(m, k, n, dtype),
            })  # fmt: skip
    return {
        "benchmark": "gemm",
        **provenance(dev, model, dtype),
        "workload": {"ms": ms, "shapes": projection_shapes(model.removeprefix("random:"))},
        "copy_GBps": measure_copy_bandwidth(dev),
        "results": rows,
    }
