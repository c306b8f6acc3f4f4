"""Round to nearest (RTN): every weight to its nearest grid point, independently. The baseline GPTQ must beat."""

from __future__ import annotations

import torch

from folovllm.quantization.grid import QuantizedWeight, find_params, quantize_codes


def check_quant_args(bits: int, group_size: int) -> None:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits!r}")
    if group_size != -1 and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be -1 (per channel) or a positive integer, got {group_size!r}")


def rtn_quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = False) -> QuantizedWeight:
    """Quantize ``weight [out, in]`` group by group; needs no data."""
    check_quant_args(bits, group_size)
    w = weight.detach().float()
    cols = w.shape[1]
    size = cols if group_size == -1 else group_size
    codes, scales, zeros = [], [], []
    for start in range(0, cols, size):
        block = w[:, start : start + size]
        scale, zero = find_params(block, bits, sym)
        codes.append(quantize_codes(block, scale, zero, bits))
        scales.append(scale)
        zeros.append(zero)
    g_idx = torch.arange(cols, device=w.device) // size
    return QuantizedWeight(
        torch.cat(codes, dim=1), torch.stack(scales), torch.stack(zeros), g_idx.to(torch.int32), bits, group_size
    )
