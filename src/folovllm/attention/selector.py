"""Which attention kernels this process can run: the checks behind ``attention_backend="auto"``.

Kept free of Triton and CUDA work so configs can ask before anything is loaded.
"""
from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from functools import cache

import torch

# (q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], cu_seqlens [B + 1] int32, max_seqlen, scale) -> [T, Hq, D]
FlashVarlenFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]


@cache
def _varlen_gqa_flag() -> dict[str, bool]:
    """``enable_gqa=True`` where ``varlen_attn`` asks for it (PyTorch 2.13); 2.11's FA2 is GQA-native without it.

    Looked up once: the call below sits on the hot path, once per layer per step.
    """
    from torch.nn.attention.varlen import varlen_attn
    return {"enable_gqa": True} if "enable_gqa" in inspect.signature(varlen_attn).parameters else {}


def torch_flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                       max_seqlen: int, scale: float) -> torch.Tensor:
    """Causal varlen attention with PyTorch's FA2 kernels."""
    from torch.nn.attention.varlen import varlen_attn
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale,
                       window_size=(-1, 0), **_varlen_gqa_flag())


def package_flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         max_seqlen: int, scale: float) -> torch.Tensor:
    """The same call through the official ``flash_attn`` package."""
    from flash_attn import flash_attn_varlen_func
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  softmax_scale=scale, causal=True)


def flash_varlen_kernel() -> tuple[str, FlashVarlenFn] | None:
    """The FA2 kernel this process can call: the official package first, then PyTorch's."""
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attn", package_flash_varlen
    if importlib.util.find_spec("torch.nn.attention.varlen") is not None:
        return "torch", torch_flash_varlen
    return None


def flash_attention_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why FA2 cannot run on ``device`` at ``dtype``; None when it can."""
    if device.type != "cuda":
        return f"FlashAttention-2 needs a CUDA device, got {device}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"FlashAttention-2 needs float16 or bfloat16, got {dtype}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"FlashAttention-2 needs compute capability 8.0+, got {torch.cuda.get_device_capability(device)}"
    if flash_varlen_kernel() is None:
        return "neither flash_attn nor torch.nn.attention.varlen is importable"
    return None
