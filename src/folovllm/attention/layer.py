"""The ``Attention`` module the model calls; the runner binds its backend and cache."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from folovllm.attention.backends.abstract import AttentionBackend, AttentionMetadata
from folovllm.attention.backends.naive import NaiveAttentionBackend
from folovllm.utils import prefix_sums


class Attention(nn.Module):
    """Multi-head attention over the flattened batch; knows nothing about requests.

    ``backend`` and ``kv_cache`` (``[2, num_blocks, block_size, Hkv, D]``) are set
    by ``bind_attention``; until then it runs the naive backend without a cache,
    which is what the M0 logits tests use. ``attn_metadata`` is whatever the
    backend built for this step (or a plain ``AttentionMetadata``).
    """

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads, self.scale = num_heads, head_dim, num_kv_heads, scale
        self.kv_cache: torch.Tensor | None = None
        self.backend: AttentionBackend = NaiveAttentionBackend()

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_metadata: Any, kv_stored: bool = False
    ) -> torch.Tensor:
        """``kv_stored``: the caller already wrote this step's K/V into ``cache_target`` (fused RoPE)."""
        num_tokens = q.shape[0]
        out = self.backend.forward(
            q.view(num_tokens, self.num_heads, self.head_dim),
            k.view(num_tokens, self.num_kv_heads, self.head_dim),
            v.view(num_tokens, self.num_kv_heads, self.head_dim),
            self.kv_cache,
            attn_metadata,
            self.scale,
            kv_stored,
        )
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def cache_target(self, attn_metadata: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(kv_cache, slot_mapping)`` where this step's K/V go, or None when there is no cache
        (or no built metadata saying where): what a kernel needs to store them itself."""
        slot_mapping = getattr(attn_metadata, "slot_mapping", None)
        if self.kv_cache is None or slot_mapping is None:
            return None
        return self.kv_cache, slot_mapping


def bind_attention(layers: list[Attention], backend: AttentionBackend, kv_caches: list[torch.Tensor] | None = None) -> None:
    """Give every layer the step's backend and, once allocated, its own slice of KV memory."""
    if kv_caches is not None and len(kv_caches) != len(layers):
        raise ValueError(f"{len(kv_caches)} KV caches for {len(layers)} attention layers")
    for i, layer in enumerate(layers):
        layer.backend = backend
        if kv_caches is not None:
            layer.kv_cache = kv_caches[i]


def prefill_metadata(seq_lens: list[int], device: torch.device | str = "cpu") -> AttentionMetadata:
    """Metadata for full prefills without a KV cache (tests, M0, the memory-profiling pass)."""
    return AttentionMetadata(
        query_start_loc=torch.tensor(prefix_sums(seq_lens), dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_table=None,
        slot_mapping=None,
        query_lens_cpu=list(seq_lens),
        seq_lens_cpu=list(seq_lens),
    )
