"""PagedAttention in Triton: one store kernel, one attention kernel for every kind of step.

Decode rows, prefills and chunked prefills of one batch go through the same
launch; the kernel reads K/V through the block table, so the cache is never
gathered into a padded copy as the naive backend does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from folovllm.attention.backends.abstract import AttentionBackend, AttentionMetadata, AttentionSpec
from folovllm.attention.ops.paged_attn import (
    PagedAttentionPlan,
    SplitScratch,
    check_paged_metadata,
    launch_paged_attention,
    launch_store_kv,
    plan_paged_attention,
)


@dataclass
class TritonAttentionMetadata:
    """One step's launch plan and split-K scratch, shared by every layer."""

    common: AttentionMetadata
    plan: PagedAttentionPlan
    scratch: SplitScratch | None

    @property
    def slot_mapping(self) -> torch.Tensor | None:
        return self.common.slot_mapping


def build_paged_metadata(
    common: AttentionMetadata, spec: AttentionSpec, max_seq_len: int | None = None, num_splits: int | None = None
) -> TritonAttentionMetadata:
    """Plan the paged kernel for ``common``; ``max_seq_len`` overrides its longest context (capture)."""
    device = common.seq_lens.device
    check_paged_metadata(common, device, common.block_size)
    plan = plan_paged_attention(
        spec, common.block_size, device, common.num_seqs, common.max_query_len,
        max_seq_len or common.max_seq_len, num_splits, common.num_tokens,
    )  # fmt: skip
    return TritonAttentionMetadata(common, plan, SplitScratch.allocate(plan, common.num_tokens, spec.num_heads, device))


def paged_attend(q: torch.Tensor, kv_cache: torch.Tensor, md: TritonAttentionMetadata, scale: float) -> torch.Tensor:
    c = md.common
    return launch_paged_attention(q, kv_cache, md.plan, c.query_start_loc, c.seq_lens, c.block_table, scale, md.scratch)


class TritonPagedAttentionBackend(AttentionBackend[TritonAttentionMetadata]):
    name = "triton"
    needs_kv_cache = True
    supports_cuda_graphs = True
    supports_mixed_cuda_graphs = True  # the grid is fixed by the token and sequence counts alone
    reads_paged_kernel = True

    def build(self, common: AttentionMetadata, spec: AttentionSpec) -> TritonAttentionMetadata:
        if common.block_table is None or common.slot_mapping is None:
            raise ValueError("metadata.block_table and metadata.slot_mapping are required by the triton backend")
        return build_paged_metadata(common, spec)

    def build_for_capture(self, common: AttentionMetadata, spec: AttentionSpec, max_seq_len: int) -> TritonAttentionMetadata:
        return build_paged_metadata(common, spec, max_seq_len)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor | None,
        metadata: TritonAttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        if kv_cache is None:
            raise ValueError("kv_cache is required by the triton backend (kv_layout='none' has no cache)")
        return paged_attend(q, kv_cache, metadata, scale)

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        launch_store_kv(k, v, kv_cache, slot_mapping)
