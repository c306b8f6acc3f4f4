"""BlockPool / KVCacheManager invariants under random operation sequences."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from folovllm.core.block_pool import BlockPool, FreeKVCacheBlockQueue, KVCacheBlock
from folovllm.core.kv_cache_manager import KVCacheManager, cdiv
from folovllm.request import Request
from folovllm.sampling_params import SamplingParams


def _req(rid: str, computed: int = 0) -> Request:
    r = Request(request_id=rid, prompt_token_ids=[0], max_tokens=1, sampling_params=SamplingParams())
    r.num_computed_tokens = computed
    return r


def check_invariants(kv: KVCacheManager) -> None:
    pool = kv.block_pool
    free_ids = pool.free_block_queue.block_ids()
    assert len(free_ids) == len(set(free_ids)) == pool.num_free_blocks
    owners: dict[int, int] = {}
    for blocks in kv.req_to_blocks.values():
        for b in blocks:
            owners[b.block_id] = owners.get(b.block_id, 0) + 1
    for block in pool.blocks:
        assert block.ref_cnt >= 0
        assert block.ref_cnt == owners.get(block.block_id, 0)
        assert (block.block_id in free_ids) == (block.ref_cnt == 0)  # never both free and used
    for rid, blocks in kv.req_to_blocks.items():
        assert len(blocks) == cdiv(kv.num_tokens[rid], kv.block_size)  # tables cover exactly the tokens


ops = st.lists(st.tuples(st.sampled_from(["grow", "free", "fork"]), st.integers(0, 5), st.integers(1, 20)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 2, 4, 16]))
def test_random_alloc_free_fork_keeps_invariants(ops, num_blocks, block_size):
    kv = KVCacheManager(num_blocks, block_size)
    reqs: dict[str, Request] = {}
    for step, (op, idx, n) in enumerate(ops):
        rid = f"r{idx}"
        if op == "grow":
            req = reqs.setdefault(rid, _req(rid))
            free_before = kv.block_pool.num_free_blocks
            if kv.allocate_slots(req, n):
                req.num_computed_tokens += n
            else:
                assert kv.block_pool.num_free_blocks == free_before  # failure changes nothing
        elif op == "free" and rid in reqs:
            kv.free(reqs.pop(rid))
        elif op == "fork" and rid in reqs and reqs[rid].num_computed_tokens:
            child = _req(f"{rid}.c{step}", computed=min(n, reqs[rid].num_computed_tokens))
            kv.fork(reqs[rid], child)
            reqs[child.request_id] = child
        kv.take_block_copies()
        check_invariants(kv)
    for req in list(reqs.values()):
        kv.free(req)
    assert kv.block_pool.num_free_blocks == num_blocks
    assert all(b.ref_cnt == 0 for b in kv.block_pool.blocks)


def test_double_free_and_bad_requests_raise():
    pool = BlockPool(2)
    blocks = pool.get_new_blocks(1)
    pool.free_blocks(blocks)
    with pytest.raises(ValueError, match="double free of block 0"):
        pool.free_blocks(blocks)
    with pytest.raises(ValueError, match="cannot get 3 blocks: only 2 free"):
        pool.get_new_blocks(3)
    pool.touch([pool.blocks[0]])  # a free block taken back: it leaves the free queue (a prefix-cache hit)
    assert pool.blocks[0].ref_cnt == 1 and 0 not in pool.free_block_queue.block_ids()
    assert pool.num_free_blocks == 1
    with pytest.raises(ValueError, match="num_blocks must be at least 1"):
        BlockPool(0)


def test_free_queue_is_fifo_and_supports_removal_from_the_middle():
    blocks = [KVCacheBlock(i) for i in range(4)]
    q = FreeKVCacheBlockQueue(blocks)
    q.remove(blocks[2])
    assert q.block_ids() == [0, 1, 3]
    assert q.popleft().block_id == 0
    q.append(blocks[0])
    assert q.block_ids() == [1, 3, 0]
    with pytest.raises(ValueError, match="block 2 is not in the free queue"):
        q.remove(blocks[2])
    for _ in range(3):
        q.popleft()
    with pytest.raises(ValueError, match="no free blocks left"):
        q.popleft()


def test_paged_usage_counts_live_slots_once_even_when_shared():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = _req("a")
    assert kv.allocate_slots(a, 6)
    a.num_computed_tokens = 6
    b = _req("b", computed=6)
    kv.fork(a, b)
    usage = kv.usage()
    assert (usage.num_used_blocks, usage.reserved_slots, usage.live_token_slots) == (2, 8, 6)
    assert usage.utilization == 0.75
