"""RMSNorm with the residual add fused in: one read of ``x`` and ``residual``, one write of each.

Unfused, ``x + residual`` then ``pow, mean, add, rsqrt, mul, cast, mul`` each launch a
kernel and move the ``[T, H]`` activation through HBM again. Rounding follows the
PyTorch reference exactly: the sum is rounded to the activation dtype, the norm is
taken in fp32 and rounded before the weight multiplies it (as HF does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from folovllm.triton_utils import for_device
from folovllm.triton_utils.pdl import launch_dependents, pdl_supported


@triton.jit
def add_residual(x, residual):
    """``x + residual`` in fp32, rounded to the residual's dtype, as PyTorch rounds the add."""
    return (x.to(tl.float32) + residual.to(tl.float32)).to(residual.dtype)


@triton.jit
def rms_rstd(row, hidden, eps):
    """``1 / rms(row)`` in fp32 over a whole (masked, zero-padded) row of ``hidden`` values."""
    rf = row.to(tl.float32)
    return 1.0 / tl.sqrt(tl.sum(rf * rf, axis=0) / hidden + eps)


@triton.jit
def rms_scale(x, rstd, weight):
    """``x * rstd`` rounded to ``x``'s dtype (as HF does) times the weight, in fp32. Shared with the skinny
    GEMM's prologue (M4), so the fused and separate paths give the same bits."""
    return (x.to(tl.float32) * rstd).to(x.dtype).to(tl.float32) * weight.to(tl.float32)


@triton.jit
def _rms_norm_kernel(
    X,
    Residual,
    Weight,
    Out,
    stride_x,
    stride_r,
    stride_o,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program per token: ``residual += x`` (in place), ``out = norm(residual) * weight``."""
    launch_dependents(PDL)  # the projection after the norm may start streaming its weights
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = add_residual(x, tl.load(Residual + row * stride_r + cols, mask=mask, other=0.0))
        tl.store(Residual + row * stride_r + cols, x, mask=mask)
    w = tl.load(Weight + cols, mask=mask, other=0.0)
    out = rms_scale(x, rms_rstd(x, HIDDEN, eps), w)
    tl.store(Out + row * stride_o + cols, out.to(Out.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``norm(x) * weight``; with ``residual``: ``(norm(x + residual) * weight, x + residual)``.

    ``residual`` is updated in place (it is the running residual stream). Rows of
    ``x`` may be strided (a view); the last dim must be contiguous.
    """
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if residual is not None:
        if residual.shape != x.shape or not residual.is_contiguous():
            raise ValueError(f"residual must be a contiguous {tuple(x.shape)} tensor, got {tuple(residual.shape)}")
        r2 = residual.view(-1, hidden)
    else:
        r2 = x2  # never read
    if x2.shape[0]:
        for_device(_rms_norm_kernel, x.device)[(x2.shape[0],)](
            x2,
            r2,
            weight,
            out,
            x2.stride(0),
            r2.stride(0),
            out.stride(0),
            eps,
            HIDDEN=hidden,
            BLOCK=triton.next_power_of_2(hidden),
            HAS_RESIDUAL=residual is not None,
            PDL=pdl_supported(x.device),
            num_warps=4 if hidden <= 2048 else 8,
        )
    out = out.view(x.shape)
    return out if residual is None else (out, residual)
