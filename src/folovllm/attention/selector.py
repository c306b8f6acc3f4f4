"""The one place that decides which attention backend a config runs, and whether it can run here.

Configs hold backend names only; the engine asks ``resolve_attention_backend``
before any weights load (so an impossible choice fails first) and the runner
builds the backend with ``get_attn_backend``. Kept free of Triton and CUDA work
until a backend is actually built.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from folovllm.config import EngineConfig

if TYPE_CHECKING:
    from folovllm.attention.backends.abstract import AttentionBackend

# (q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], cu_seqlens [B + 1] int32, max_seqlen, scale) -> [T, Hq, D]
FlashVarlenFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]


def torch_flash_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    """Causal varlen attention with PyTorch's FA2 kernel (GQA-native: k and v keep their few heads).

    Called through the ATen op that ``torch.nn.attention.varlen.varlen_attn`` wraps. That wrapper
    is a Python custom op: on the H200 it added tens of microseconds of host time per call (one
    call per layer in every prefill step, which is host-bound at batch 1) and launched a fill
    kernel for an RNG state inference never reads; the kernel and its output are the same.
    """
    out, *_ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, True, False, scale=scale
    )
    return out


def package_flash_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    """The same call through the official ``flash_attn`` package."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale, causal=True)


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


def resolve_attention_backend(config: EngineConfig) -> str:
    """The backend name ``config`` runs: its own, or for "auto" FA2 from M4 on where it runs, the Triton
    paged kernel on CUDA with a paged cache, naive everywhere else. Raises if an explicit choice cannot run."""
    requested, device, dtype = config.attention_backend, config.device, config.model_config.dtype
    if requested == "flash_attn":
        why = flash_attention_unavailable(device, dtype)
        if why is not None:
            raise ValueError(f"attention_backend='flash_attn' cannot run here: {why}")
    if requested != "auto":
        return requested
    if device.type != "cuda" or config.cache_config.kv_layout != "paged":
        return "naive"
    if config.includes("M4") and flash_attention_unavailable(device, dtype) is None:
        return "flash_attn"
    return "triton"


def get_attn_backend(name: str) -> AttentionBackend:
    """A fresh backend object of ``name`` (as ``resolve_attention_backend`` returns it)."""
    if name == "naive":
        from folovllm.attention.backends.naive import NaiveAttentionBackend

        return NaiveAttentionBackend()
    if name == "triton":
        from folovllm.attention.backends.triton_paged import TritonPagedAttentionBackend

        return TritonPagedAttentionBackend()
    if name == "flash_attn":
        from folovllm.attention.backends.flash_attn import FlashAttentionBackend

        return FlashAttentionBackend()
    raise ValueError(f"attention_backend must be 'naive', 'triton' or 'flash_attn', got {name!r}")
