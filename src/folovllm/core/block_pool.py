"""Physical KV blocks: a pool with reference counts, an O(1) free queue and (M6) a prefix cache.

The free queue is a doubly linked list (not a deque) because prefix caching
must pull a cached block out of the *middle* of the queue when a new request
hits it. With caching on, a freed full block keeps its hash and its K/V: it
sits in the free queue, least recently freed first, and is evicted (its hash
forgotten) only when ``get_new_blocks`` hands it out for new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from folovllm.core.kv_cache_utils import BlockHash


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None  # set while the block is in the prefix cache
    parent_hash: BlockHash | None = None  # the prefix before it (None: a first block); for the trie view
    token_ids: tuple[int, ...] = ()  # what it holds while cached; for the trie view and checks
    prev_free: "KVCacheBlock | None" = None
    next_free: "KVCacheBlock | None" = None

    def __repr__(self) -> str:
        cached = f", hash={self.block_hash.hex()[:8]}" if self.block_hash else ""
        return f"KVCacheBlock(id={self.block_id}, ref_cnt={self.ref_cnt}{cached})"


class FreeKVCacheBlockQueue:
    """Free blocks in eviction order; popleft, append and remove are all O(1)."""

    def __init__(self, blocks: list[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free
        if block is self._tail:
            raise ValueError("no free blocks left in the queue")
        self.remove(block)
        return block

    def append(self, block: KVCacheBlock) -> None:
        last = self._tail.prev_free
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block
        self.num_free_blocks += 1

    def remove(self, block: KVCacheBlock) -> None:
        if block.prev_free is None or block.next_free is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        block.prev_free.next_free, block.next_free.prev_free = block.next_free, block.prev_free
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def block_ids(self) -> list[int]:
        ids, node = [], self._head.next_free
        while node is not self._tail:
            ids.append(node.block_id)
            node = node.next_free
        return ids


class BlockPool:
    """Owns every ``KVCacheBlock``; hands them out and takes them back by ref count.

    For prefix caching (M6) it keeps ``cached_block_hash_to_block``: one block
    per prefix hash, in use or evictable. A block that fills with a prefix some other
    block already holds stays out of the map (it is freed like any other), so a
    request's block table never changes under it.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_block_queue = FreeKVCacheBlockQueue(self.blocks)
        # region M6: the prefix cache
        self.cached_block_hash_to_block: dict[BlockHash, KVCacheBlock] = {}
        self.num_evictions = 0
        # endregion

    @property
    def num_free_blocks(self) -> int:
        return self.free_block_queue.num_free_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take ``num_blocks`` free blocks (ref_cnt becomes 1); all or nothing."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"cannot get {num_blocks} blocks: only {self.num_free_blocks} free")
        blocks = [self.free_block_queue.popleft() for _ in range(num_blocks)]
        for block in blocks:
            # region M6: eviction
            if block.block_hash is not None:
                self._evict(block)
            # endregion
            block.ref_cnt = 1
        return blocks

    # region M6: the prefix cache
    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self.cached_block_hash_to_block.get(block_hash)

    def cache_full_block(
        self, block: KVCacheBlock, block_hash: BlockHash, parent_hash: BlockHash | None, token_ids: tuple[int, ...]
    ) -> bool:
        """Name ``block`` by the prefix it now holds; False if it is already named or another block holds it."""
        if block.block_hash is not None or block_hash in self.cached_block_hash_to_block:
            return False
        block.block_hash, block.parent_hash, block.token_ids = block_hash, parent_hash, token_ids
        self.cached_block_hash_to_block[block_hash] = block
        return True

    def _evict(self, block: KVCacheBlock) -> None:
        """The block is about to hold new tokens: its prefix is no longer cached."""
        del self.cached_block_hash_to_block[block.block_hash]
        block.block_hash, block.parent_hash, block.token_ids = None, None, ()
        self.num_evictions += 1

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (e.g. after new weights); refused (False) while any block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.cached_block_hash_to_block.values():
            block.block_hash, block.parent_hash, block.token_ids = None, None, ()
        self.cached_block_hash_to_block.clear()
        return True

    # endregion

    def touch(self, blocks: list[KVCacheBlock]) -> None:
        """One more owner for each block (a forked sequence or a prefix-cache hit now shares it).

        A block nobody owns is still in the free queue (a cached prefix waiting
        to be evicted); a hit takes it back out, so it cannot be evicted while used.
        """
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, blocks: list[KVCacheBlock]) -> None:
        """Drop one owner of each block; blocks nobody owns go back to the queue.

        Freed in reverse order so a request's tail blocks are evicted first: a
        cached prefix loses its longest (least shared) blocks before its shorter ones.
        """
        for block in reversed(blocks):
            if block.ref_cnt < 1:
                raise ValueError(f"double free of block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue.append(block)
