"""The contract every attention backend follows.

One KV cache layout for all backends (the paged layout flash-attn also reads):
per layer a tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(index 0 = K, 1 = V). Contiguous slabs (M1/M2) are runs of consecutive
blocks in the same tensor, so switching KV managers never changes a kernel.

Each step the runner describes the batch once (``AttentionMetadata``); the
backend turns that into its own typed metadata once (``build``: launch plans,
index tensors, scratch buffers), and every layer reuses it (vLLM v1's
metadata-builder pattern). ``build_for_capture`` is the CUDA-graph variant:
everything fixed by the padded batch size alone, nothing taken from this
step's lengths on the host.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Generic, TypeVar

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
    num_tokens: int = field(init=False)
    max_query_len: int = field(init=False)
    max_seq_len: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_tokens = sum(self.query_lens_cpu)
        self.max_query_len = max(self.query_lens_cpu, default=0)
        self.max_seq_len = max(self.seq_lens_cpu, default=0)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1


@dataclass(frozen=True)
class AttentionSpec:
    """The geometry every attention layer of a model shares."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor) -> "AttentionSpec":
        return cls(q.shape[1], k.shape[1], q.shape[2], q.dtype)


M = TypeVar("M")


class AttentionBackend(ABC, Generic[M]):
    """Stores the step's new K/V into the cache, then attends over the context."""

    name: str = "abstract"
    needs_kv_cache: bool = False  # True: cannot run the cacheless prefill of the memory profiling pass
    supports_cuda_graphs: bool = False  # True: build_for_capture gives a replayable decode launch
    supports_mixed_cuda_graphs: bool = False  # True: ... and a replayable launch for any ragged batch
    reads_paged_kernel: bool = False  # True: some rows run the Triton paged kernel (warmed up at start-up)

    @abstractmethod
    def build(self, common: AttentionMetadata, spec: AttentionSpec) -> M:
        """This backend's metadata for one step, built once and shared by every layer."""

    def build_for_capture(self, common: AttentionMetadata, spec: AttentionSpec, max_seq_len: int) -> M:
        """Metadata for a step captured in a CUDA graph: the launch may depend on
        ``common``'s number of sequences and tokens, its longest query (the bound
        the graph is planned for) and ``max_seq_len`` (the longest context it will
        ever replay with), never on the lengths it holds at capture time."""
        raise ValueError(f"the {self.name} backend cannot be captured in a CUDA graph")

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor | None,
        metadata: M | AttentionMetadata,
        scale: float,
        kv_stored: bool = False,
    ) -> torch.Tensor:
        """``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` -> ``[T, Hq, D]``.

        ``metadata`` is what ``build`` returned; a plain ``AttentionMetadata`` is
        built here on the fly (tests and one-off calls). The step's K/V are first
        written to the cache at ``metadata.slot_mapping``, unless the caller did so
        (``kv_stored``: the fused RoPE kernel). Without a cache (``kv_cache is None``)
        every sequence is a full prefill and attends over the ``k, v`` given.
        """
        if isinstance(metadata, AttentionMetadata):
            metadata = self.build(metadata, AttentionSpec.of(q, k))
        if kv_cache is not None and not kv_stored:
            slot_mapping = metadata.slot_mapping
            if slot_mapping is None:
                raise ValueError("metadata.slot_mapping is required to store K/V in the cache")
            self.store_kv(k, v, kv_cache, slot_mapping)
        return self.attend(q, k, v, kv_cache, metadata, scale)

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write the step's K/V into their cache slots (an indexed copy; kernels override it)."""
        store_kv_reference(k, v, kv_cache, slot_mapping)

    @abstractmethod
    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor | None, metadata: M, scale: float
    ) -> torch.Tensor:
        """Attention over the context, whose K/V (this step's included) are in the cache: the per-layer hot path."""


def store_kv_reference(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write token ``t``'s K/V into flat slot ``slot_mapping[t]`` (an indexed copy)."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    flat = kv_cache.view(2, -1, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))
