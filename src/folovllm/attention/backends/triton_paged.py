"""PagedAttention in Triton: one store kernel, one attention kernel for every kind of step.

Decode rows, prefills and chunked prefills of one batch go through the same
launch; the kernel reads K/V through the block table, so the cache is never
gathered into a padded copy as the naive backend does.
"""
from __future__ import annotations

import torch

from folovllm.attention.backends.abstract import AttentionBackend, AttentionMetadata
from folovllm.attention.ops.triton_paged_attn import paged_attention, store_kv


class TritonPagedAttentionBackend(AttentionBackend):
    name = "triton"
    needs_kv_cache = True

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor | None, metadata: AttentionMetadata,
                scale: float) -> torch.Tensor:
        if kv_cache is None:
            raise ValueError("kv_cache is required by the triton backend (kv_layout='none' has no cache)")
        if metadata.block_table is None or metadata.slot_mapping is None:
            raise ValueError("metadata.block_table and metadata.slot_mapping are required by the triton backend")
        store_kv(k, v, kv_cache, metadata.slot_mapping)
        return paged_attention(q, kv_cache, metadata, scale)
