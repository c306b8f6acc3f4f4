"""FlashAttention-2 for fresh prefills, the Triton PagedAttention kernel for rows that read the cache.

FlashAttention tiles Q, K and V through on-chip SRAM and keeps a running
softmax, so the ``T x T`` score matrix never reaches HBM: prefill attention
needs O(T) memory instead of O(T^2) and runs near the matmul peak. Its varlen
form takes our flattened ragged batch as it is, described by ``cu_seqlens``.

A fresh prefill (no cached context) attends only over the K/V it has just
computed, so FA2 reads them straight from the step's ``k, v``. Rows with a
cached context (decode rows; chunked and prefix-cached prefills later) go to
the M3 Triton kernel, which reads K/V through the block table. A step holding
both kinds splits its rows between the two kernels. Newer PyTorch (2.13) and
the official package can also read a paged cache inside FA2, but the PyTorch
2.11 of the GPU machines this book measures on cannot, so there is one path.

The FA2 kernel is the official ``flash_attn`` package when it is installed,
else PyTorch's own build (``torch.nn.attention.varlen.varlen_attn``). Both
need a CUDA GPU of compute capability 8.0 or newer and fp16/bf16 tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from folovllm.attention.backends.abstract import AttentionBackend, AttentionMetadata
from folovllm.attention.ops.triton_paged_attn import paged_attention, store_kv
from folovllm.attention.selector import FlashVarlenFn, flash_varlen_kernel


@dataclass
class _Split:
    """One step's rows by kernel; built once per step and shared by every layer.

    ``fresh_*`` describe the FA2 part (its own ``cu_seqlens``), ``cached_*`` the
    paged part (its own metadata). A ``*_tokens`` index is None when that part
    covers the whole batch, so the common all-prefill and all-decode steps copy nothing.
    """

    fresh_tokens: slice | torch.Tensor | None
    fresh_cu: torch.Tensor | None
    fresh_max_len: int
    cached_tokens: slice | torch.Tensor | None
    cached_md: AttentionMetadata | None


def _split(md: AttentionMetadata, device: torch.device) -> _Split:
    if "flash_split" in md.backend_cache:
        return md.backend_cache["flash_split"]
    fresh = [b for b, (q, s) in enumerate(zip(md.query_lens_cpu, md.seq_lens_cpu)) if q == s]
    cached = [b for b, (q, s) in enumerate(zip(md.query_lens_cpu, md.seq_lens_cpu)) if q != s]
    starts = list(accumulate(md.query_lens_cpu, initial=0))

    def tokens(rows: list[int]) -> slice | torch.Tensor:
        """Token positions of ``rows``: a view-making slice when they are consecutive (the scheduler
        puts running requests before new ones), else an index tensor."""
        if rows == list(range(rows[0], rows[-1] + 1)):
            return slice(starts[rows[0]], starts[rows[-1] + 1])
        return torch.tensor([t for b in rows for t in range(starts[b], starts[b + 1])], device=device)

    def cu(rows: list[int]) -> torch.Tensor:
        lens = (md.query_lens_cpu[b] for b in rows)
        return torch.tensor(list(accumulate(lens, initial=0)), dtype=torch.int32, device=device)

    split = _Split(None, None, 0, None, None)
    if fresh:
        split.fresh_max_len = max(md.query_lens_cpu[b] for b in fresh)
        split.fresh_cu = md.query_start_loc if not cached else cu(fresh)
        split.fresh_tokens = tokens(fresh) if cached else None
    if cached:
        if md.block_table is None:
            raise ValueError("rows with a cached context need metadata.block_table")
        if not fresh:
            split.cached_md = md
        else:
            rows = torch.tensor(cached, device=device)
            split.cached_tokens = tokens(cached)
            split.cached_md = AttentionMetadata(
                query_start_loc=cu(cached), seq_lens=md.seq_lens[rows], block_table=md.block_table[rows],
                slot_mapping=None, query_lens_cpu=[md.query_lens_cpu[b] for b in cached],
                seq_lens_cpu=[md.seq_lens_cpu[b] for b in cached], block_size=md.block_size)
    md.backend_cache["flash_split"] = split
    return split


class FlashAttentionBackend(AttentionBackend):
    """FA2 (varlen) for fresh prefills + Triton PagedAttention for rows with a cached context.

    ``kernel`` replaces the FA2 call (tests pass a PyTorch reference); by default
    the best installed one is used.
    """

    name = "flash_attn"

    def __init__(self, kernel: FlashVarlenFn | None = None) -> None:
        if kernel is None:
            found = flash_varlen_kernel()
            if found is None:
                raise ValueError("attention_backend='flash_attn' needs the flash_attn package or "
                                 "torch.nn.attention.varlen")
            self.kernel_name, kernel = found
        else:
            self.kernel_name = getattr(kernel, "__name__", "custom")
        self.kernel = kernel

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor | None, metadata: AttentionMetadata,
                scale: float) -> torch.Tensor:
        if kv_cache is not None:
            if metadata.slot_mapping is None:
                raise ValueError("metadata.slot_mapping is required to store K/V in the cache")
            store_kv(k, v, kv_cache, metadata.slot_mapping)
        split = _split(metadata, q.device)
        if split.cached_md is not None and kv_cache is None:
            raise ValueError("rows with a cached context need a kv_cache")
        if split.cached_md is None:
            return self.kernel(q, k, v, split.fresh_cu, split.fresh_max_len, scale)
        if split.fresh_cu is None:
            return paged_attention(q, kv_cache, split.cached_md, scale)
        out = torch.empty_like(q)
        fi, ci = split.fresh_tokens, split.cached_tokens
        out[fi] = self.kernel(q[fi], k[fi], v[fi], split.fresh_cu, split.fresh_max_len, scale)
        out[ci] = paged_attention(q[ci], kv_cache, split.cached_md, scale)
        return out
