"""``y = x W^T`` for the one to four rows of a small decode batch, where cuBLAS leaves bandwidth unused.

A batch-1 decode step is a chain of matrix-vector products, each bound by reading its weight
once. For a small model those weights are a few MiB, and on an H200 cuBLAS streamed Qwen3-0.6B's
at 0.33-2.1 TB/s of a 4.2 TB/s copy rate (``o_proj`` 12.7 µs for 4 MiB: a quarter of the step's
matmul time). Reading a weight fast takes many bytes in flight at once, so here every program
loads its whole ``[BLOCK_N, BLOCK_K]`` tile with one load, there is no loop, and the K ranges of
one output tile meet through split-K (``split_k.py``): a 4 MiB weight is a few hundred programs
that all have their bytes requested within the first microsecond.

The product keeps the weight tile in the layout it was loaded in: ``w * x[None, :]`` then a sum
over K. (The first version of this kernel, removed after its H200 run, multiplied a
``[M, N, K]`` broadcast, and Triton moved the weight tile between layouts through shared
memory in every iteration: slower than cuBLAS on four of five shapes. ``compile_skinny``
shows what the compiler makes of a plan.)

Whether it beats cuBLAS depends on the shape and the GPU, so the fast path uses it only for the
shapes a sweep on that GPU model measured faster (``bench gemm --sweep`` writes
``configs/skinny_gemm_<GPU>.json``, as vLLM keeps tuned kernel configs per device); elsewhere,
and on CPU, ``F.linear``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import torch
import triton
import triton.language as tl

from folovllm.model_executor.layers.ops.split_k import store_tile, tile_counters
from folovllm.triton_utils import for_device
from folovllm.utils import cdiv

SKINNY_MAX_M = 4  # rows of x: the batch-1, 2 and 4 decode graphs
TUNED_DIR = Path(__file__).parent / "configs"
_use_tuned = True  # False inside ``cublas_only()``


@triton.jit
def _skinny_gemm_kernel(
    X, W, Bias, Out, Partials, Counters, M, N, K, stride_xm, stride_wn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    """Grid ``(M, cdiv(N, BLOCK_N), SPLIT_K)``: row ``m`` of x times columns ``rn`` of W over one K range."""
    row = tl.program_id(0)
    split = tl.program_id(2)
    rm = row + tl.arange(0, 1)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = split * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok, k_ok = rn < N, rk < K
    w = tl.load(W + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    x = tl.load(X + row.to(tl.int64) * stride_xm + rk, mask=k_ok, other=0.0)
    acc = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    store_tile(acc[None, :], Out, Bias, Partials, Counters, rm, rn, rm < M, n_ok, M, N, split, HAS_BIAS, SPLIT_K)


@dataclass(frozen=True)
class SkinnyPlan:
    """One launch: ``block_n`` output columns times ``block_k`` inputs per program (its whole share)."""

    block_n: int
    block_k: int
    num_warps: int

    def split_k(self, k: int) -> int:
        return cdiv(k, self.block_k)


def sweep_skinny_plans(k: int) -> list[SkinnyPlan]:
    """Plans worth timing for a ``K``-input weight: tiles of 8-32 KiB of bf16, K in 1-8 splits."""
    plans = []
    for block_k in (256, 512, 1024, 2048, 4096):
        if block_k > 2 * triton.next_power_of_2(k) or cdiv(k, block_k) > 8:
            continue
        for tile_elems in (4096, 8192, 16384):
            block_n = tile_elems // block_k
            if 1 <= block_n <= 64:
                plans.extend(SkinnyPlan(block_n, block_k, warps) for warps in (4, 8))
    return plans


def tuned_key(m: int, k: int, n: int) -> str:
    return f"m={m},k={k},n={n}"


def tuned_plans_path(gpu_name: str) -> Path:
    return TUNED_DIR / f"skinny_gemm_{gpu_name.replace(' ', '_')}.json"


@cache
def _tuned_plans(path: Path) -> dict[str, SkinnyPlan]:
    if not path.is_file():
        return {}
    return {key: SkinnyPlan(**plan) for key, plan in json.loads(path.read_text())["plans"].items()}


def write_tuned_plans(gpu_name: str, plans: dict[str, dict], source: dict) -> Path:
    """Save the plans a sweep measured faster than cuBLAS on this GPU model; the fast path reads them."""
    path = tuned_plans_path(gpu_name)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"source": source, "plans": plans}, indent=1) + "\n")
    _tuned_plans.cache_clear()
    plan_skinny_gemm.cache_clear()
    return path


@lru_cache(maxsize=1024)  # asked by every eager call of a Linear on the fast path
def plan_skinny_gemm(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device) -> SkinnyPlan | None:
    """The tuned plan for ``[m, k] x [k, n]`` on this GPU model, or None (then cuBLAS).

    One row only. A decode step of three requests replays the graph captured for four, while the
    same step run eagerly has three rows: with a plan per row count the two would run different
    kernels and their tokens could differ in the last bits (the H200 GPU test that graph replays
    give eager tokens caught it). At one row both are the same launch; batch 1 is where it pays."""
    if not _use_tuned or device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or m != 1:
        return None
    return _tuned_plans(tuned_plans_path(torch.cuda.get_device_name(device))).get(tuned_key(m, k, n))


@contextmanager
def cublas_only() -> Iterator[None]:
    """Engines built (and graphs captured) inside use ``F.linear`` for every shape: the A/B baseline."""
    global _use_tuned
    _use_tuned = False
    plan_skinny_gemm.cache_clear()
    try:
        yield
    finally:
        _use_tuned = True
        plan_skinny_gemm.cache_clear()


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: SkinnyPlan) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x [M, K]`` (``M <= SKINNY_MAX_M``) and a row-major ``weight [N, K]``."""
    m, k = x.shape
    n = weight.shape[0]
    if m > SKINNY_MAX_M or weight.shape[1] != k or weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"skinny_gemm needs x [<= {SKINNY_MAX_M}, K] and weight [N, K] with contiguous rows, "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")  # fmt: skip
    split = plan.split_k(k)
    grid = (m, cdiv(n, plan.block_n), split)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    partials = counters = out
    if split > 1:
        partials = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
        counters = tile_counters(x.device, grid[0] * grid[1])
    for_device(_skinny_gemm_kernel, x.device)[grid](
        x, weight, weight if bias is None else bias, out, partials, counters, m, n, k, x.stride(0), weight.stride(0),
        BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, HAS_BIAS=bias is not None, SPLIT_K=split,
        num_warps=plan.num_warps,
    )  # fmt: skip
    return out


def compile_skinny(plan: SkinnyPlan, k: int, capability: int = 90) -> dict[str, str]:
    """The kernel as ``skinny_gemm`` launches ``plan`` on bf16 for a ``K``-input weight, compiled for an NVIDIA
    GPU of compute capability ``capability`` on any machine: its layouts, barriers and loads."""
    from folovllm.triton_utils.offline_compile import compile_for_gpu

    types = dict(X="*bf16", W="*bf16", Bias="*bf16", Out="*bf16", Partials="*fp32", Counters="*i32", M="i32",
                 N="i32", K="i32", stride_xm="i32", stride_wn="i32")  # fmt: skip
    constexprs = dict(BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, HAS_BIAS=False, SPLIT_K=plan.split_k(k))
    return compile_for_gpu(_skinny_gemm_kernel, types, constexprs, ("N", "K", "stride_xm", "stride_wn"), capability,
                           plan.num_warps, 1)  # fmt: skip
