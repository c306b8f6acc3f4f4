"""Who owns which KV slots: one interface, three memory policies.

- ``NoKVCacheManager`` (M0): nothing is cached; every step recomputes the sequence.
- ``ContiguousKVCacheManager`` (M1/M2): each request reserves a whole
  ``max_model_len`` slab up front, like a ``malloc`` of the worst case.
- ``KVCacheManager`` (M3+): ``block_size``-token blocks handed out as tokens
  arrive, shared by reference count and copied on write; from M6 also shared
  across requests through the prefix cache.

All three speak in block ids of the same cache tensor, so the model runner
and every attention kernel work unchanged whichever policy is in charge.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

from folovllm.core.block_pool import BlockPool, KVCacheBlock
from folovllm.core.kv_cache_utils import PrefixCacheStats, hash_request_tokens
from folovllm.request import Request
from folovllm.utils import cdiv


@dataclass
class KVCacheUsage:
    """A snapshot: slots set aside for requests vs slots holding live tokens."""

    num_blocks: int
    num_used_blocks: int
    reserved_slots: int
    live_token_slots: int

    @property
    def utilization(self) -> float:
        """Fraction of reserved slots that hold a token (1.0 when nothing is reserved)."""
        return self.live_token_slots / self.reserved_slots if self.reserved_slots else 1.0


class BaseKVCacheManager(ABC):
    """What the scheduler may ask of KV memory."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_tokens: dict[str, int] = {}  # tokens each request will have stored after this step
        self._reported: dict[str, int] = {}  # leading block-table entries the runner already holds

    @abstractmethod
    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[KVCacheBlock] | None = None
    ) -> bool:
        """Make room for ``num_new_tokens`` after the computed ones; False (and no change) if full.

        ``new_computed_blocks``: what ``get_computed_blocks`` found for a request being admitted
        (None when it was not looked up); they become the start of its block table.
        """

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Cached blocks a new request can start from, and the tokens they hold: none without a prefix cache."""
        return [], 0

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; True when done (trivially, without a prefix cache)."""
        return True

    @abstractmethod
    def free(self, request: Request) -> None:
        """Give back everything ``request`` holds."""

    @abstractmethod
    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table: logical block i lives in physical block ids[i]."""

    @abstractmethod
    def usage(self) -> KVCacheUsage: ...

    def take_new_block_ids(self, request_id: str) -> tuple[int, list[int]]:
        """``(offset, ids)``: the request's block table changed from entry ``offset`` on and now ends with
        ``ids``. The runner keeps its copy of each table up to date from these changes alone."""
        offset = self._reported.get(request_id, 0)
        table = self.get_block_ids(request_id)
        self._reported[request_id] = len(table)
        return offset, table[offset:]

    def _forget(self, request_id: str) -> None:
        self.num_tokens.pop(request_id, None)
        self._reported.pop(request_id, None)

    def can_fork(self) -> bool:
        return False

    def fork(self, parent: Request, child: Request) -> None:
        raise ValueError(f"{type(self).__name__} cannot share blocks between requests")

    def take_block_copies(self) -> list[tuple[int, int]]:
        """Copy-on-write (src, dst) block pairs the runner must copy before this step's forward."""
        return []


class NoKVCacheManager(BaseKVCacheManager):
    """M0: no cache at all; attention recomputes K/V of the whole sequence each step."""

    def __init__(self) -> None:
        super().__init__(num_blocks=0, block_size=1)

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[KVCacheBlock] | None = None
    ) -> bool:
        return True

    def free(self, request: Request) -> None:
        self._forget(request.request_id)

    def get_block_ids(self, request_id: str) -> list[int]:
        return []

    def usage(self) -> KVCacheUsage:
        return KVCacheUsage(0, 0, 0, 0)


class ContiguousKVCacheManager(BaseKVCacheManager):
    """M1/M2: a request reserves ``cdiv(max_model_len, block_size)`` consecutive blocks."""

    def __init__(self, num_blocks: int, block_size: int, max_model_len: int) -> None:
        super().__init__(num_blocks, block_size)
        self.blocks_per_slab = cdiv(max_model_len, block_size)
        self.num_slabs = num_blocks // self.blocks_per_slab
        if self.num_slabs < 1:
            raise ValueError(
                f"kv_cache_memory holds {num_blocks} blocks, fewer than one max_model_len slab "
                f"({self.blocks_per_slab} blocks); raise kv_cache_memory or lower max_model_len"
            )
        self.free_slabs: deque[int] = deque(range(self.num_slabs))
        self.slab_of: dict[str, int] = {}

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[KVCacheBlock] | None = None
    ) -> bool:
        rid = request.request_id
        if rid not in self.slab_of:
            if not self.free_slabs:
                return False
            self.slab_of[rid] = self.free_slabs.popleft()
        self.num_tokens[rid] = request.num_computed_tokens + num_new_tokens
        return True

    def free(self, request: Request) -> None:
        slab = self.slab_of.pop(request.request_id, None)
        if slab is not None:
            self.free_slabs.append(slab)
        self._forget(request.request_id)

    def get_block_ids(self, request_id: str) -> list[int]:
        first = self.slab_of[request_id] * self.blocks_per_slab
        return list(range(first, first + cdiv(self.num_tokens[request_id], self.block_size)))

    def take_new_block_ids(self, request_id: str) -> tuple[int, list[int]]:
        """A slab's table only grows at its end: the new entries are computed, not sliced from a list."""
        offset = self._reported.get(request_id, 0)
        first = self.slab_of[request_id] * self.blocks_per_slab
        end = cdiv(self.num_tokens[request_id], self.block_size)
        self._reported[request_id] = end
        return offset, list(range(first + offset, first + end))

    def usage(self) -> KVCacheUsage:
        used = len(self.slab_of) * self.blocks_per_slab
        return KVCacheUsage(self.num_blocks, used, used * self.block_size, sum(self.num_tokens.values()))


class KVCacheManager(BaseKVCacheManager):
    """M3: paged KV memory. Blocks come from a ``BlockPool`` only when tokens need them.

    With ``enable_caching`` (M6, vLLM's prefix caching) every block full of known
    tokens is named in the pool by its prefix hash, and a new request starts after
    the longest run of its leading blocks already there (``get_computed_blocks``).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        super().__init__(num_blocks, block_size)
        self.block_pool = BlockPool(num_blocks)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self._pending_copies: list[tuple[int, int]] = []
        # region M6: prefix caching
        self.enable_caching = enable_caching
        self.num_cached_block: dict[str, int] = {}  # leading blocks of each request already named in the pool
        self._stats = PrefixCacheStats()
        # endregion

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[KVCacheBlock] | None = None
    ) -> bool:
        rid = request.request_id
        blocks = self.req_to_blocks.get(rid, [])
        # region M6: a prefix-cache hit starts the block table
        hits = list(new_computed_blocks or ())
        if hits:
            if blocks:
                raise ValueError(f"request {rid!r} already holds blocks; cached blocks can only start a table")
            blocks = list(hits)
        # endregion
        start, end = request.num_computed_tokens, request.num_computed_tokens + num_new_tokens
        if (
            end <= len(blocks) * self.block_size
            and start // self.block_size == (end - 1) // self.block_size
            and blocks[start // self.block_size].ref_cnt == 1
        ):
            self.num_tokens[rid] = end  # the common decode step: room in an unshared last block
            if self.enable_caching:
                self._cache_full_blocks(request, blocks, end)
            return True
        # region copy-on-write
        # Blocks this step writes into that another sequence still reads: copy them first.
        shared = [
            i for i in range(start // self.block_size, min(len(blocks), cdiv(end, self.block_size))) if blocks[i].ref_cnt > 1
        ]
        num_new_blocks = cdiv(end, self.block_size) - len(blocks)
        # endregion
        # A hit on a cached block nobody uses takes it out of the free queue: one free block fewer.
        if num_new_blocks + len(shared) + sum(b.ref_cnt == 0 for b in hits) > self.block_pool.num_free_blocks:
            return False
        self.block_pool.touch(hits)
        # region copy-on-write
        for i in shared:
            fresh = self.block_pool.get_new_blocks(1)[0]
            self._pending_copies.append((blocks[i].block_id, fresh.block_id))
            self.block_pool.free_blocks([blocks[i]])
            blocks[i] = fresh
            self._reported[rid] = min(self._reported.get(rid, 0), i)
        # endregion
        if num_new_blocks > 0:
            blocks.extend(self.block_pool.get_new_blocks(num_new_blocks))
        self.req_to_blocks[rid] = blocks
        self.num_tokens[rid] = end
        # region M6: prefix caching
        if self.enable_caching:
            if new_computed_blocks is not None:  # the scheduler looked this request up
                self._stats.requests += 1
                self._stats.queries += request.num_tokens
                self._stats.hits += len(hits) * self.block_size
                self.num_cached_block[rid] = len(hits)
            self._cache_full_blocks(request, blocks, end)
        # endregion
        return True

    # region M6: prefix caching
    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest run of ``request``'s leading full blocks already cached, and the tokens they hold.

        Never the whole sequence: its last token is always computed again, because
        the step needs that token's logits to sample the next one. Nothing changes
        until ``allocate_slots`` takes the blocks (the lookup may still fail for room).
        """
        if not self.enable_caching:
            return [], 0
        hashes = hash_request_tokens(request, self.block_size)
        hits = []
        for block_hash in hashes[: (request.num_tokens - 1) // self.block_size]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def _cache_full_blocks(self, request: Request, blocks: list[KVCacheBlock], end: int) -> None:
        """Name each block that is full of known tokens once this step runs by its prefix hash.

        Named at allocation, before the forward writes them: whoever hits them runs in
        this step or a later one, and attention stores a step's K/V before reading any.
        A token still being sampled (async scheduling) is not known yet: its block is
        named a step later. O(1) when no block filled up.
        """
        rid = request.request_id
        done = self.num_cached_block.get(rid, 0)
        num_full = min(end, request.num_tokens) // self.block_size
        if num_full <= done:
            return
        hashes = hash_request_tokens(request, self.block_size)
        tokens, size = request.all_token_ids, self.block_size
        for i in range(done, num_full):
            self.block_pool.cache_full_block(
                blocks[i], hashes[i], hashes[i - 1] if i else None, tuple(tokens[i * size : (i + 1) * size])
            )
        self.num_cached_block[rid] = num_full

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        """A snapshot of the lookups, hits and evictions so far."""
        return replace(self._stats, evictions=self.block_pool.num_evictions)

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()

    # endregion

    def free(self, request: Request) -> None:
        self.block_pool.free_blocks(self.req_to_blocks.pop(request.request_id, []))
        self.num_cached_block.pop(request.request_id, None)
        self._forget(request.request_id)

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]

    def take_new_block_ids(self, request_id: str) -> tuple[int, list[int]]:
        """Only the changed tail is read: O(new blocks) per step, not O(context)."""
        offset = self._reported.get(request_id, 0)
        blocks = self.req_to_blocks.get(request_id, [])
        self._reported[request_id] = len(blocks)
        return offset, [b.block_id for b in blocks[offset:]]

    def can_fork(self) -> bool:
        return True

    def fork(self, parent: Request, child: Request) -> None:
        """``child`` shares the blocks holding its first ``num_computed_tokens`` tokens."""
        if child.request_id in self.req_to_blocks:
            raise ValueError(f"request {child.request_id!r} already holds blocks; cannot fork into it")
        shared = self.req_to_blocks[parent.request_id][: cdiv(child.num_computed_tokens, self.block_size)]
        self.block_pool.touch(shared)
        self.req_to_blocks[child.request_id] = list(shared)
        self.num_tokens[child.request_id] = child.num_computed_tokens

    def take_block_copies(self) -> list[tuple[int, int]]:
        copies, self._pending_copies = self._pending_copies, []
        return copies

    def usage(self) -> KVCacheUsage:
        filled: dict[int, int] = {}
        for rid, blocks in self.req_to_blocks.items():
            n = self.num_tokens[rid]
            for i, block in enumerate(blocks):
                used = min(self.block_size, n - i * self.block_size)
                filled[block.block_id] = max(filled.get(block.block_id, 0), used)
        num_used = self.num_blocks - self.block_pool.num_free_blocks
        return KVCacheUsage(self.num_blocks, num_used, num_used * self.block_size, sum(filled.values()))
