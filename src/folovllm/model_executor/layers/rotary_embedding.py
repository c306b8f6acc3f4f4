"""Rotary position embeddings (RoPE) in HF's "rotate half" (GPT-NeoX) layout.

cos/sin for every position up to ``max_position`` are computed once, in fp32,
at construction; a forward only indexes them with the step's positions, so a
token's rotation depends on its position alone, never on how the batch is laid out.
The fused kernel (M4) reads the same table and also applies Qwen3's q/k norm.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from folovllm.model_executor.layers.custom_op import CustomOp

ROPE_TYPES = ("default", "llama3")


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The RoPE settings of an HF config as one dict with ``rope_type`` and ``rope_theta``.

    transformers 5 keeps them in ``rope_parameters``; older configs split them
    into ``rope_theta`` and ``rope_scaling`` (whose type key may be ``type``).
    """
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1+ scaling: keep short wavelengths, divide long ones by ``factor``, blend between."""
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(CustomOp):
    """Holds ``cos_sin_cache [max_position, head_dim]`` (cos halves, then sin halves).

    One instance is shared by every attention layer. ``cos_sin`` gathers the
    step's rows once per forward for the native path; the fused kernel reads the
    table itself, so it needs nothing per step.
    """

    def __init__(self, head_dim: int, max_position: int, params: dict[str, Any]) -> None:
        super().__init__()
        rope_type = params["rope_type"]
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {list(ROPE_TYPES)}")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"partial_rotary_factor is not supported, got {params['partial_rotary_factor']!r}")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        self.head_dim = head_dim
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv_freq = 1.0 / (params["rope_theta"] ** exponents)
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, params)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``cos, sin [T, 1, head_dim // 2]`` for the given positions, in the activations' dtype
        (None on the fused path, which reads the table directly)."""
        if self.use_fused:
            return None
        cos, sin = self.cos_sin_cache[positions].to(dtype).unsqueeze(1).chunk(2, dim=-1)
        return cos, sin

    def forward_native(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        v: torch.Tensor | None = None,
        cache_target: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``q [T, Hq, D]``, ``k [T, Hkv, D]`` rotated (after the optional per-head norms): new tensors.
        ``v`` and ``cache_target`` are ignored: here the attention backend stores K/V."""
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        return apply_rotary_emb(q, *cos_sin), apply_rotary_emb(k, *cos_sin)

    def forward_fused(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        cos_sin: None,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        v: torch.Tensor | None = None,
        cache_target: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same, in place, in one kernel for both q and k; with ``cache_target``
        (``kv_cache, slot_mapping``) that kernel also writes the rotated K and ``v`` into the cache."""
        from folovllm.model_executor.layers.ops.rotary import rotary_qk_

        kv_cache, slot_mapping = cache_target if cache_target is not None else (None, None)
        rotary_qk_(
            q,
            k,
            positions,
            self.cos_sin_cache,
            None if q_norm is None else q_norm.weight,
            None if k_norm is None else k_norm.weight,
            1e-6 if q_norm is None else q_norm.eps,
            None if kv_cache is None else v,
            kv_cache,
            slot_mapping,
        )
        return q, k


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, H, D]``: pairs are (i, i + D/2), as in HF's ``rotate_half``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
