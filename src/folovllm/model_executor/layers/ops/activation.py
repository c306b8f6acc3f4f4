"""``silu(gate) * up`` on the merged ``gate_up_proj`` output: one kernel instead of chunk, silu, mul."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from folovllm.triton_utils import for_device
from folovllm.triton_utils.pdl import launch_dependents, pdl_supported


@triton.jit
def silu_mul(gate, up):
    """``silu(gate) * up`` rounded as PyTorch rounds it: silu to the input dtype, then the product. Shared
    with the skinny GEMM's prologue (M4), so the fused and separate paths give the same bits."""
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    return (act * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _silu_and_mul_kernel(X, Out, stride_x, stride_o, INTER: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Grid ``(tokens, cdiv(INTER, BLOCK))``: one block of ``silu_mul`` per program."""
    launch_dependents(PDL)  # ``down_proj`` may start streaming its weights
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(X + row * stride_x + INTER + cols, mask=mask, other=0.0)
    tl.store(Out + row * stride_o + cols, silu_mul(gate, up).to(Out.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``[..., 2 * I] -> [..., I]``: the first half is the gate, the second half the up projection."""
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * inter)
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(inter))
    if x2.shape[0]:
        for_device(_silu_and_mul_kernel, x.device)[(x2.shape[0], triton.cdiv(inter, block))](
            x2, out, x2.stride(0), out.stride(0), INTER=inter, BLOCK=block, PDL=pdl_supported(x.device), num_warps=4
        )
    return out.view(*x.shape[:-1], inter)
