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

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import triton
import triton.language as tl

from folovllm.model_executor.layers.ops.activation import silu_mul
from folovllm.model_executor.layers.ops.rms_norm import add_residual, rms_rstd, rms_scale
from folovllm.model_executor.layers.ops.split_k import store_tile
from folovllm.triton_utils import for_device
from folovllm.triton_utils.counters import tile_counters
from folovllm.triton_utils.tuned import TunedTable
from folovllm.utils import cdiv

SKINNY_MAX_M = 4  # rows of x: the batch-1, 2 and 4 decode graphs
_use_tuned = True  # False inside ``cublas_only()``
_fuse_prologues = True  # False inside ``separate_prologues()``


NO_PROLOGUE, RMS_NORM, SILU_MUL = 0, 1, 2  # what the kernel computes from X before multiplying


@triton.jit
def _input_slice(
    X, Residual, ResidualOut, NormWeight, row, rk, k_ok, K, stride_xm, eps,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, K_ROW: tl.constexpr,
):  # fmt: skip
    """This program's fp32 slice ``rk`` of the GEMM input, rounded as the separate kernels would round it.

    ``RMS_NORM``: ``norm(x + residual) * weight``. The norm needs the whole row, so every program reads it
    (``K`` values from L2) and reduces it itself; the programs of the first column tile write the new
    residual (out of place: the others are still reading the old one). ``SILU_MUL``: X holds
    ``[gate | up]`` (``2 K`` values per row) and the slice is ``silu(gate) * up``. The roundings are the
    separate kernels' own helpers (``rms_norm.py``, ``activation.py``)."""
    x_row = X + row.to(tl.int64) * stride_xm
    part = tl.load(x_row + rk, mask=k_ok, other=0.0)
    if PROLOGUE == 1:
        cols = tl.arange(0, K_ROW)
        full = tl.load(x_row + cols, mask=cols < K, other=0.0)
        if HAS_RESIDUAL:
            r_row = Residual + row.to(tl.int64) * K
            full = add_residual(full, tl.load(r_row + cols, mask=cols < K, other=0.0))
            part = add_residual(part, tl.load(r_row + rk, mask=k_ok, other=0.0))
            tl.store(ResidualOut + row.to(tl.int64) * K + rk, part, mask=k_ok & (tl.program_id(1) == 0))
        weight = tl.load(NormWeight + rk, mask=k_ok, other=0.0)
        part = rms_scale(part, rms_rstd(full, K, eps), weight).to(part.dtype)
    elif PROLOGUE == 2:
        part = silu_mul(part, tl.load(x_row + K + rk, mask=k_ok, other=0.0))
    return part.to(tl.float32)


@triton.jit
def _skinny_gemm_kernel(
    X, W, Bias, Out, Partials, Counters, Residual, ResidualOut, NormWeight, M, N, K, stride_xm, stride_wn, eps,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, K_ROW: tl.constexpr,
):  # fmt: skip
    """Grid ``(M, cdiv(N, BLOCK_N), SPLIT_K)``: row ``m`` of the input times columns ``rn`` of W over one
    K range; the input is X itself or what ``PROLOGUE`` computes from it (``_input_slice``)."""
    row = tl.program_id(0)
    split = tl.program_id(2)
    rm = row + tl.arange(0, 1)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = split * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok, k_ok = rn < N, rk < K
    w = tl.load(W + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    x = _input_slice(X, Residual, ResidualOut, NormWeight, row, rk, k_ok, K, stride_xm, eps,
                     PROLOGUE, HAS_RESIDUAL, K_ROW)  # fmt: skip
    acc = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    store_tile(acc[None, :], Out, Bias, Partials, Counters, rm, rn, rm < M, n_ok, M, N, split, HAS_BIAS, SPLIT_K)


@dataclass(frozen=True)
class SkinnyPlan:
    """One launch: ``block_n`` output columns times ``block_k`` inputs per program (its whole share)."""

    block_n: int
    block_k: int
    num_warps: int

    def split_k(self, k: int) -> int:
        return cdiv(k, self.block_k)


TUNED = TunedTable(Path(__file__).parent / "configs", "skinny_gemm", SkinnyPlan)


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


def write_tuned_plans(gpu_name: str, plans: dict[str, dict], source: dict) -> Path:
    """Save the plans a sweep measured faster than cuBLAS on this GPU model; the fast path reads them."""
    path = TUNED.write(gpu_name, plans, source)
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
    return TUNED.plans(torch.cuda.get_device_name(device)).get(tuned_key(m, k, n))


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


@contextmanager
def separate_prologues() -> Iterator[None]:
    """Engines built inside keep the skinny GEMM but launch the norms and SiLU·mul on their own: the A/B
    baseline of the fused prologues."""
    global _fuse_prologues
    _fuse_prologues = False
    try:
        yield
    finally:
        _fuse_prologues = True


def prologues_fused() -> bool:
    return _fuse_prologues


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: SkinnyPlan) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x [M, K]`` (``M <= SKINNY_MAX_M``) and a row-major ``weight [N, K]``."""
    _check(x, weight, x.shape[1])
    return _launch(x, weight, bias, plan, x.shape[1], NO_PROLOGUE)


def skinny_gemm_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    plan: SkinnyPlan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rms_norm`` then ``skinny_gemm`` in one launch: ``(F.linear(norm(x + residual) * norm_weight, weight,
    bias), x + residual)``; without ``residual`` the norm is of ``x`` and ``x`` is returned as the residual."""
    _check(x, weight, x.shape[1])
    if residual is not None and (residual.shape != x.shape or not residual.is_contiguous()):
        raise ValueError(f"residual must be a contiguous {tuple(x.shape)} tensor, got {tuple(residual.shape)}")
    new_residual = x if residual is None else torch.empty_like(residual)
    out = _launch(x, weight, bias, plan, x.shape[1], RMS_NORM, residual, new_residual, norm_weight, eps)
    return out, new_residual


def skinny_gemm_silu_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: SkinnyPlan) -> torch.Tensor:
    """``silu_and_mul`` then ``skinny_gemm`` in one launch: ``x [M, 2K]`` holds ``[gate | up]``."""
    k = x.shape[1] // 2
    _check(x, weight, k)
    return _launch(x, weight, bias, plan, k, SILU_MUL)


def _check(x: torch.Tensor, weight: torch.Tensor, k: int) -> None:
    if x.shape[0] > SKINNY_MAX_M or weight.shape[1] != k or weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"skinny_gemm needs x [<= {SKINNY_MAX_M}, K] and weight [N, K] with contiguous rows, "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")  # fmt: skip


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    plan: SkinnyPlan,
    k: int,
    prologue: int,
    residual: torch.Tensor | None = None,
    new_residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    m, n = x.shape[0], weight.shape[0]
    split = plan.split_k(k)
    grid = (m, cdiv(n, plan.block_n), split)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    partials = counters = out
    if split > 1:
        partials = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
        counters = tile_counters(x.device, grid[0] * grid[1])
    unused = x  # pointer arguments a prologue does not read
    for_device(_skinny_gemm_kernel, x.device)[grid](
        x, weight, weight if bias is None else bias, out, partials, counters,
        unused if residual is None else residual, unused if new_residual is None else new_residual,
        unused if norm_weight is None else norm_weight, m, n, k, x.stride(0), weight.stride(0), eps,
        BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, HAS_BIAS=bias is not None, SPLIT_K=split, PROLOGUE=prologue,
        HAS_RESIDUAL=residual is not None, K_ROW=triton.next_power_of_2(k) if prologue == RMS_NORM else 1,
        num_warps=plan.num_warps,
    )  # fmt: skip
    return out


def compile_skinny(plan: SkinnyPlan, k: int, capability: int = 90, prologue: int = NO_PROLOGUE) -> dict[str, str]:
    """The kernel as ``skinny_gemm`` (or a fused variant, ``prologue``) launches ``plan`` on bf16 for a
    ``K``-input weight, compiled for an NVIDIA GPU of compute capability ``capability`` on any machine: its
    layouts, barriers and loads."""
    from folovllm.triton_utils.offline_compile import compile_for_gpu

    types = dict(X="*bf16", W="*bf16", Bias="*bf16", Out="*bf16", Partials="*fp32", Counters="*i32", Residual="*bf16",
                 ResidualOut="*bf16", NormWeight="*bf16", M="i32", N="i32", K="i32", stride_xm="i32", stride_wn="i32",
                 eps="fp32")  # fmt: skip
    constexprs = dict(BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, HAS_BIAS=False, SPLIT_K=plan.split_k(k),
                      PROLOGUE=prologue, HAS_RESIDUAL=prologue == RMS_NORM, K_ROW=triton.next_power_of_2(k))  # fmt: skip
    return compile_for_gpu(_skinny_gemm_kernel, types, constexprs, ("N", "K", "stride_xm", "stride_wn"), capability,
                           plan.num_warps, 1)  # fmt: skip
