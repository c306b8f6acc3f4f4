"""The contract every attention backend follows.

One KV cache layout for all backends (the paged layout flash-attn also reads):
per layer a tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(index 0 = K, 1 = V). Contiguous slabs (M1/M2) are runs of consecutive
blocks in the same tensor, so switching KV managers never changes a kernel.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """What attention needs to know about one flattened ragged batch of T tokens.

    Sequence ``b`` owns query tokens ``query_start_loc[b]:query_start_loc[b+1]``;
    after this step its context holds ``seq_lens[b]`` tokens, so its queries sit
    at positions ``seq_lens[b] - query_len .. seq_lens[b] - 1``.
    """

    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_table: torch.Tensor | None  # [B, max_blocks] int32; None without a KV cache
    slot_mapping: torch.Tensor | None  # [T] int64: where each new token's K/V is written
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int = 0  # tokens per KV block (0 without a cache)
    # Index tensors a backend derives once per step and reuses in every layer.
    backend_cache: dict[str, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens_cpu)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu)

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(ABC):
    """Stores the step's new K/V into the cache, then attends over the context."""

    name: str = "abstract"
    needs_kv_cache: bool = False  # True: cannot run the cacheless prefill of the memory profiling pass

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor | None, metadata: AttentionMetadata,
                scale: float) -> torch.Tensor:
        """``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` -> ``[T, Hq, D]``.

        Without a cache (``kv_cache is None``) every sequence is a full prefill
        and attends over the ``k, v`` given.
        """


def store_kv_reference(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """Write token ``t``'s K/V into flat slot ``slot_mapping[t]`` (an indexed copy)."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    flat = kv_cache.view(2, -1, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))
