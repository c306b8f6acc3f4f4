"""Prefix-cache keys: a chain of SHA-256 block hashes, and the counters that show the cache at work.

A full block's hash covers its parent's hash, its own token ids and extra keys
(vLLM v1's scheme), so one hash names the whole prefix up to the end of its
block: two requests share a block exactly when they share everything before
it. The hash must be collision resistant (a collision would serve one user's
KV to another), so it is SHA-256 over a canonical byte encoding, never
Python's ``hash`` (64 bits, and salted per process) or ``pickle`` (its bytes
are not a canonical form of the value).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

from folovllm.request import Request

BlockHash = NewType("BlockHash", bytes)  # 32 bytes of SHA-256: names a whole prefix, not just one block

# The parent of every first block. A per-deployment random root (vLLM seeds it) would also hide
# which prompts are cached from anyone able to compute hashes; a fixed one keeps runs reproducible.
NONE_HASH = BlockHash(hashlib.sha256(b"folovllm prefix cache root").digest())


def hash_block_tokens(parent: BlockHash | None, token_ids: Sequence[int], extra_keys: Sequence[str] = ()) -> BlockHash:
    """SHA-256 of ``parent || len || token ids || extra keys``, every field length-prefixed.

    Fixed-width little-endian ids and length prefixes make the encoding injective:
    no two different (parent, tokens, keys) give the same bytes, so only a
    SHA-256 collision could make two different prefixes share a hash.
    """
    h = hashlib.sha256(parent or NONE_HASH)
    h.update(struct.pack(f"<I{len(token_ids)}I", len(token_ids), *token_ids))
    for key in extra_keys:
        data = key.encode()
        h.update(struct.pack("<I", len(data)) + data)
    return BlockHash(h.digest())


def hash_request_tokens(request: Request, block_size: int) -> list[BlockHash]:
    """Extend ``request.block_hashes`` to every full block of its known tokens and return it.

    Incremental (only blocks filled since the last call are hashed), so calling it
    every step costs O(new blocks). ``cache_salt`` enters the first block only; the
    chain carries it into every later hash, so tenants with different salts never
    share a block.
    """
    hashes = request.block_hashes
    tokens = request.all_token_ids
    for i in range(len(hashes), len(tokens) // block_size):
        extra = (request.cache_salt,) if i == 0 and request.cache_salt is not None else ()
        hashes.append(
            hash_block_tokens(hashes[-1] if hashes else None, tokens[i * block_size : (i + 1) * block_size], extra)
        )
    return hashes


@dataclass
class PrefixCacheStats:
    """Running totals: ``queries`` prompt tokens looked up, ``hits`` of them found cached (vLLM's names).

    ``requests`` counts lookups (a preempted request looks up again when it
    returns); ``evictions`` counts cached blocks dropped to make room.
    """

    requests: int = 0
    queries: int = 0
    hits: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def since(self, earlier: "PrefixCacheStats") -> "PrefixCacheStats":
        """The counts between an earlier snapshot and this one."""
        return PrefixCacheStats(
            self.requests - earlier.requests,
            self.queries - earlier.queries,
            self.hits - earlier.hits,
            self.evictions - earlier.evictions,
        )
