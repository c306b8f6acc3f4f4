"""FlashAttention-2 for fresh prefills, the Triton PagedAttention kernel for rows that read the cache.

FlashAttention tiles Q, K and V through on-chip SRAM and keeps a running
softmax, so the ``T x T`` score matrix never reaches HBM: prefill attention
needs O(T) memory instead of O(T^2) and moves far fewer bytes (on an H200 it reached 40% of the
measured matmul rate at 16k tokens, the naive path 1.5%). Its varlen
form takes our flattened ragged batch as it is, described by ``cu_seqlens``.

A fresh prefill (no cached context) attends only over the K/V it has just
computed, so FA2 reads them straight from the step's ``k, v``. Rows with a
cached context (decode rows; chunked and prefix-cached prefills later) go to
the M3 Triton kernel, which reads K/V through the block table. A step holding
both kinds splits its rows between the two kernels. A step replayed from a
CUDA graph runs on the paged kernel alone: its launch is fixed by token and
sequence counts, while FA2's needs this step's longest prompt on the host. Newer PyTorch (2.13) and
the official package can also read a paged cache inside FA2, but the PyTorch
2.11 of the GPU machines this book measures on cannot, so there is one path.

The FA2 kernel is the official ``flash_attn`` package when it is installed,
else PyTorch's own build (``torch.nn.attention.varlen.varlen_attn``). Both
need a CUDA GPU of compute capability 8.0 or newer and fp16/bf16 tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from folovllm.attention.backends.abstract import AttentionBackend, AttentionMetadata, AttentionSpec
from folovllm.attention.backends.triton_paged import TritonAttentionMetadata, build_paged_metadata, paged_attend
from folovllm.attention.ops.paged_attn import launch_store_kv
from folovllm.attention.selector import FlashVarlenFn, flash_varlen_kernel
from folovllm.utils import prefix_sums, to_device


@dataclass
class FlashAttentionMetadata:
    """One step's rows by kernel; built once per step and shared by every layer.

    ``fresh_*`` describe the FA2 part (its own ``cu_seqlens``), ``cached`` the
    paged part (its own plan). A ``*_tokens`` index is None when that part
    covers the whole batch, so the common all-prefill and all-decode steps copy nothing.
    """

    slot_mapping: torch.Tensor | None
    fresh_tokens: slice | torch.Tensor | None
    fresh_cu: torch.Tensor | None
    fresh_max_len: int
    cached_tokens: slice | torch.Tensor | None
    cached: TritonAttentionMetadata | None


def _consecutive(rows: list[int]) -> bool:
    """The scheduler puts running requests before new ones, so a kind's rows are usually one run."""
    return rows == list(range(rows[0], rows[-1] + 1))


def rows_of(table: torch.Tensor, picked: slice | torch.Tensor) -> torch.Tensor:
    """``table[picked]`` with ``table``'s row stride. The paged kernel compiles one variant per
    divisibility of that stride, and the engine warms up the one its persistent table has; a
    gathered copy's stride is the step's width (on the H200: compiles in mid-serving)."""
    if isinstance(picked, slice):
        return table[picked]
    out = torch.empty(len(picked), table.stride(0), dtype=table.dtype, device=table.device)[:, : table.shape[1]]
    return out.copy_(table[picked])


def split_rows(md: AttentionMetadata, spec: AttentionSpec) -> FlashAttentionMetadata:
    """Fresh prefills (``query_len == seq_len``) to FA2, every row with a cached context to the paged kernel."""
    device = md.seq_lens.device
    fresh = [b for b, (q, s) in enumerate(zip(md.query_lens_cpu, md.seq_lens_cpu)) if q == s]
    cached = [b for b, (q, s) in enumerate(zip(md.query_lens_cpu, md.seq_lens_cpu)) if q != s]
    starts = prefix_sums(md.query_lens_cpu)

    def tokens(rows: list[int]) -> slice | torch.Tensor:
        """Token positions of ``rows``: a view-making slice when they are consecutive, else an index tensor."""
        if _consecutive(rows):
            return slice(starts[rows[0]], starts[rows[-1] + 1])
        return to_device([t for b in rows for t in range(starts[b], starts[b + 1])], torch.int64, device)

    def cu(rows: list[int]) -> torch.Tensor:
        return to_device(prefix_sums(md.query_lens_cpu[b] for b in rows), torch.int32, device)

    split = FlashAttentionMetadata(md.slot_mapping, None, None, 0, None, None)
    if fresh:
        split.fresh_max_len = max(md.query_lens_cpu[b] for b in fresh)
        split.fresh_cu = md.query_start_loc if not cached else cu(fresh)
        split.fresh_tokens = tokens(fresh) if cached else None
    if cached:
        if md.block_table is None:
            raise ValueError("rows with a cached context need metadata.block_table")
        part = md
        if fresh:
            picked = slice(cached[0], cached[-1] + 1) if _consecutive(cached) else to_device(cached, torch.int64, device)
            split.cached_tokens = tokens(cached)
            part = AttentionMetadata(
                query_start_loc=cu(cached),
                seq_lens=md.seq_lens[picked],
                block_table=rows_of(md.block_table, picked),
                slot_mapping=None,
                query_lens_cpu=[md.query_lens_cpu[b] for b in cached],
                seq_lens_cpu=[md.seq_lens_cpu[b] for b in cached],
                block_size=md.block_size,
            )
        split.cached = build_paged_metadata(part, spec)
    return split


class FlashAttentionBackend(AttentionBackend[FlashAttentionMetadata]):
    """FA2 (varlen) for fresh prefills + Triton PagedAttention for rows with a cached context.

    ``kernel`` replaces the FA2 call (tests pass a PyTorch reference); by default
    the best installed one is used.
    """

    name = "flash_attn"
    supports_cuda_graphs = True  # a captured step (decode or mixed) runs on the paged kernel alone
    supports_mixed_cuda_graphs = True
    reads_paged_kernel = True

    def __init__(self, kernel: FlashVarlenFn | None = None) -> None:
        if kernel is None:
            found = flash_varlen_kernel()
            if found is None:
                raise ValueError("attention_backend='flash_attn' needs the flash_attn package or torch.nn.attention.varlen")
            self.kernel_name, kernel = found
        else:
            self.kernel_name = getattr(kernel, "__name__", "custom")
        self.kernel = kernel

    def build(self, common: AttentionMetadata, spec: AttentionSpec) -> FlashAttentionMetadata:
        return split_rows(common, spec)

    def build_for_capture(self, common: AttentionMetadata, spec: AttentionSpec, max_seq_len: int) -> FlashAttentionMetadata:
        return FlashAttentionMetadata(
            common.slot_mapping, None, None, 0, None, build_paged_metadata(common, spec, max_seq_len)
        )

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor | None,
        metadata: FlashAttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        if metadata.cached is not None and kv_cache is None:
            raise ValueError("rows with a cached context need a kv_cache")
        if metadata.cached is None:
            return self.kernel(q, k, v, metadata.fresh_cu, metadata.fresh_max_len, scale)
        if metadata.fresh_cu is None:
            return paged_attend(q, kv_cache, metadata.cached, scale)
        out = torch.empty_like(q)
        fi, ci = metadata.fresh_tokens, metadata.cached_tokens
        out[fi] = self.kernel(q[fi], k[fi], v[fi], metadata.fresh_cu, metadata.fresh_max_len, scale)
        out[ci] = paged_attend(q[ci], kv_cache, metadata.cached, scale)
        return out

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        launch_store_kv(k, v, kv_cache, slot_mapping)
