"""``y = x W^T`` for the few rows of a small decode batch: a weight-streaming GEMV instead of cuBLAS.

At batch 1 a decode step is a chain of matrix-vector products, each bound by
reading its weight once from HBM. For a small model those weights are a few
MB, and cuBLAS picks tiles for them that keep few SMs busy: on an H200,
Qwen3-0.6B's four projections ran at 0.8-1.6 TB/s of a 4.2 TB/s copy rate,
29 µs of a 47 µs layer. Here each program owns ``BLOCK_N`` output columns,
streams their weight rows along K in contiguous chunks and keeps the few
activation rows in registers, so the grid has a few hundred programs for any
of those shapes and no split-K merge. Rows of x beyond ``SKINNY_MAX_M`` go back
to cuBLAS, whose tiles pay off once the weight is reused across rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from folovllm.triton_utils import for_device

SKINNY_MAX_M = 4  # rows of x: the batch-1, 2 and 4 decode graphs
# cuBLAS streamed Qwen3-8B's 33-100 MB projections at 2.6-4.0 TB/s on an H200 at M = 1 (M7's kernel
# table) but 0.8-1.6 TB/s on Qwen3-0.6B's 4-13 MB ones: the skinny kernel takes the small weights only.
SKINNY_MAX_WEIGHT_BYTES = 16 * 2**20
_TARGET_PROGRAMS = 256  # about two per SM on an H100/H200


@triton.jit
def _skinny_gemm_kernel(
    X, W, Bias, Out, M, N, K, stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """Grid ``(cdiv(N, BLOCK_N),)``: columns ``rn`` of all ``M`` rows, accumulated in fp32 over K."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_ok, m_ok = rn < N, rm < M
    w_rows = W + rn.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        x = tl.load(X + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = Out + rm[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def uses_skinny_gemm(m: int, k: int, n: int, dtype: torch.dtype) -> bool:
    """Whether the fast path multiplies ``[m, k] x [k, n]`` with the skinny kernel rather than cuBLAS."""
    return m <= SKINNY_MAX_M and k * n * torch.finfo(dtype).bits // 8 <= SKINNY_MAX_WEIGHT_BYTES


def skinny_block_n(n: int) -> int:
    """Columns per program: as many as keep about ``_TARGET_PROGRAMS`` programs, between 2 and 16."""
    return max(2, min(16, triton.next_power_of_2(max(1, n // _TARGET_PROGRAMS) + 1) // 2))


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x [M, K]`` with ``M <= SKINNY_MAX_M``, ``weight [N, K]`` row-major."""
    m, k = x.shape
    n = weight.shape[0]
    if m > SKINNY_MAX_M or weight.shape[1] != k or weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"skinny_gemm needs x [<= {SKINNY_MAX_M}, K] and weight [N, K] with contiguous rows, "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")  # fmt: skip
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)  # a one-row block (M = 1) is padded to two rows
    block_n = skinny_block_n(n)
    block_k = min(4096 // block_n, triton.next_power_of_2(k))  # 8 KB of bf16 weight per program and step
    for_device(_skinny_gemm_kernel, x.device)[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=max(2, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None,
        num_warps=8,
    )  # fmt: skip
    return out
