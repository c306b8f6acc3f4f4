"""Prefix caching (M6): the hash chain, the pool's LRU cache, and outputs that never change because of it.

Scheduler tests use ``test_scheduler``'s fake runner, which really reads K/V back
through the block tables: a block served from the cache with the wrong content,
or reused while another request still reads it, changes the outputs.
"""

from __future__ import annotations

import hashlib
import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_block_pool import check_invariants
from test_scheduler import VOCAB, FakeRunner, expected_output, make_request, run, run_async

from folovllm import LLM, SamplingParams
from folovllm.config import CacheConfig, SchedulerConfig
from folovllm.core.kv_cache_manager import KVCacheManager
from folovllm.core.kv_cache_utils import NONE_HASH, hash_block_tokens, hash_request_tokens
from folovllm.core.prefix_tree import build_prefix_tree
from folovllm.core.sched.scheduler import Scheduler
from folovllm.request import RequestStatus


def cached_scheduler(
    num_blocks: int, block_size: int, max_model_len: int = 64, max_num_seqs: int = 8, caching: bool = True
) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_model_len)
    return Scheduler(cfg, KVCacheManager(num_blocks, block_size, enable_caching=caching), max_model_len)


def check_cache(kv: KVCacheManager, runner: FakeRunner, salts: tuple[str, ...] = ()) -> None:
    """Ref counts = owners; a block is free-listed iff unused; the hash map names only blocks whose
    K/V (what the fake runner stored) is the prefix their hash names."""
    check_invariants(kv)  # ref counts = owners, free-listed iff unused, tables cover their tokens
    pool = kv.block_pool
    for block in pool.blocks:
        assert (block.block_hash is None) or pool.cached_block_hash_to_block[block.block_hash] is block
    size = kv.block_size
    for block_hash, block in pool.cached_block_hash_to_block.items():
        assert block.block_hash == block_hash and len(block.token_ids) == size
        extras = [()] if block.parent_hash is not None else [(), *((s,) for s in salts)]
        assert block_hash in {hash_block_tokens(block.parent_hash, block.token_ids, e) for e in extras}
        stored = [runner.slots.get(block.block_id * size + off) for off in range(size)]
        assert stored == list(block.token_ids), f"block {block.block_id} is named by tokens it does not hold"


def checking(runner: FakeRunner, kv: KVCacheManager, salts: tuple[str, ...] = ()) -> FakeRunner:
    """Check the cache after every step's forward (when every named block has been written)."""
    execute = runner.execute

    def execute_and_check(out):
        result = execute(out)
        check_cache(kv, runner, salts)
        return result

    runner.execute = execute_and_check
    return runner


# ---- the hash chain ------------------------------------------------------------------------------
def test_block_hash_is_sha256_over_a_length_prefixed_little_endian_encoding():
    tokens = [1, 2, 70000]
    expected = hashlib.sha256(
        NONE_HASH
        + struct.pack("<I", 3)
        + b"".join(t.to_bytes(4, "little") for t in tokens)
        + struct.pack("<I", 5)
        + b"alice"
    ).digest()
    assert hash_block_tokens(None, tokens, ("alice",)) == expected
    first = hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(first, [3, 4]) != hash_block_tokens(hash_block_tokens(None, [9, 9]), [3, 4])
    assert hash_block_tokens(None, [1, 2], ("a",)) != hash_block_tokens(None, [1, 2], ("b",))
    assert hash_block_tokens(None, [1, 2], ("ab",)) != hash_block_tokens(None, [1, 2], ("a", "b"))
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [1, 2], ("",))


def test_request_hashes_grow_with_its_tokens_and_the_salt_changes_every_block():
    req = make_request("r", list(range(10)), 8)
    assert len(hash_request_tokens(req, 4)) == 2
    for t in (10, 11):
        req.append_output_token(t)
    chain = hash_request_tokens(req, 4)
    assert len(chain) == 3
    parent = None
    for i, h in enumerate(chain):
        assert h == hash_block_tokens(parent, list(range(i * 4, i * 4 + 4)))
        parent = h
    salted = make_request("s", list(range(12)), 8, cache_salt="tenant-b")
    assert all(a != b for a, b in zip(chain, hash_request_tokens(salted, 4)))


# ---- the pool: LRU free queue, hits, eviction -----------------------------------------------------
def test_freed_blocks_stay_cached_in_lru_order_until_a_new_block_needs_them():
    kv = KVCacheManager(num_blocks=6, block_size=2, enable_caching=True)
    pool = kv.block_pool
    a = make_request("a", [5, 6, 7, 8, 9], 1)
    assert kv.get_computed_blocks(a) == ([], 0)
    assert kv.allocate_slots(a, 5, [])
    a_ids = kv.get_block_ids("a")
    assert len(pool.cached_block_hash_to_block) == 2  # two full blocks named, the partial one not
    kv.free(a)
    assert pool.free_block_queue.block_ids() == [3, 4, 5, *reversed(a_ids)]  # tail blocks evicted first
    b = make_request("b", [5, 6, 7, 8, 1], 1)
    hits, b.num_computed_tokens = kv.get_computed_blocks(b)
    assert ([h.block_id for h in hits], b.num_computed_tokens) == (a_ids[:2], 4)
    assert kv.allocate_slots(b, 1, hits)
    assert [pool.blocks[i].ref_cnt for i in a_ids[:2]] == [1, 1] and a_ids[0] not in pool.free_block_queue.block_ids()
    c = make_request("c", list(range(20, 26)), 1)
    assert kv.allocate_slots(c, 6, kv.get_computed_blocks(c)[0])  # 3 new blocks: 2 never used, then a's tail
    assert pool.num_evictions == 0  # a's partial tail block was never named
    d = make_request("d", [30, 31], 1)
    assert not kv.allocate_slots(d, 2, [])  # b and c hold everything else
    kv.free(c)
    assert kv.allocate_slots(d, 2, [])
    assert pool.num_evictions == 1  # c's last block: c's tail went to the queue first
    stats = kv.prefix_cache_stats
    assert (stats.requests, stats.queries, stats.hits, stats.evictions) == (4, 5 + 5 + 6 + 2, 4, 1)


def test_the_last_token_is_always_recomputed():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True)
    first = make_request("a", list(range(8)), 1)
    kv.allocate_slots(first, 8, [])
    again = make_request("b", list(range(8)), 1)
    assert kv.get_computed_blocks(again)[1] == 4  # not 8: the step needs the last token's logits
    longer = make_request("c", list(range(9)), 1)
    assert kv.get_computed_blocks(longer)[1] == 8


def test_reset_prefix_cache_is_refused_while_blocks_are_used():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_caching=True)
    a = make_request("a", [1, 2, 3], 1)
    kv.allocate_slots(a, 3, [])
    assert not kv.reset_prefix_cache()
    kv.free(a)
    assert kv.reset_prefix_cache() and not kv.block_pool.cached_block_hash_to_block
    assert kv.get_computed_blocks(make_request("b", [1, 2, 3], 1)) == ([], 0)


# ---- the scheduler ---------------------------------------------------------------------------------
def test_num_cached_tokens_is_exact_and_a_different_salt_never_hits():
    sched = cached_scheduler(64, 4)
    runner = checking(FakeRunner(4), sched.kv_cache_manager, ("u1", "u2"))
    prompt = [(3 * j + 1) % VOCAB for j in range(10)]
    reqs = {
        "a": make_request("a", prompt, 5, cache_salt="u1"),
        "b": make_request("b", prompt[:9] + [50, 51, 52], 5, cache_salt="u1"),
        "c": make_request("c", prompt, 5, cache_salt="u2"),
        "d": make_request("d", prompt, 5, cache_salt="u2"),
        "e": make_request("e", prompt, 5),
    }
    starts: dict[str, int] = {}
    execute = runner.execute

    def record(out):
        for s in out.scheduled:
            starts.setdefault(s.req_id, s.start_pos)
        return execute(out)

    runner.execute = record
    finished, _ = run(sched, runner, {0: [reqs["a"]], 1: [reqs["b"], reqs["c"]], 2: [reqs["d"], reqs["e"]]})
    assert {r: reqs[r].num_cached_tokens for r in reqs} == {"a": 0, "b": 8, "c": 0, "d": 8, "e": 0}
    assert starts == {r: reqs[r].num_cached_tokens for r in reqs}
    assert finished == {r: expected_output(req.prompt_token_ids, 5) for r, req in reqs.items()}


def test_a_preempted_request_finds_its_own_blocks_again():
    prompts = [[(7 * i + j) % VOCAB for j in range(20)] for i in range(6)]  # no prefix shared across requests
    sched = cached_scheduler(num_blocks=14, block_size=4)
    for i, p in enumerate(prompts):
        sched.add_request(make_request(f"r{i}", p, 24))
    finished, _ = run(sched, checking(FakeRunner(4), sched.kv_cache_manager))
    stats = sched.kv_cache_manager.prefix_cache_stats
    assert sched.num_preemptions > 0 and stats.requests == 6 + sched.num_preemptions
    assert stats.hits > 0 and stats.evictions > 0
    assert finished == {f"r{i}": expected_output(p, 24) for i, p in enumerate(prompts)}


prefix_workloads = st.lists(
    st.tuples(
        st.integers(0, 6),  # arrival step
        st.integers(0, 2),  # which shared prefix
        st.integers(0, 30),  # its length
        st.integers(1, 12),  # own suffix length
        st.integers(1, 16),  # max tokens
        st.booleans(),
    ),  # with a copy-on-write sibling (n = 2)
    min_size=1,
    max_size=10,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    workload=prefix_workloads,
    block_size=st.sampled_from([1, 2, 4]),
    tiny=st.booleans(),
    use_async=st.booleans(),
    salted=st.booleans(),
    seed=st.integers(0, 3),
    abort=st.integers(-1, 9),
)
def test_random_shared_prefix_workloads_keep_outputs_and_cache_invariants(
    workload, block_size, tiny, use_async, salted, seed, abort
):
    """Prefix hits, eviction under a tiny pool, preemption, forks, aborts, async scheduling: outputs
    equal running each request alone, and the cache invariants hold after every step."""
    max_model_len = 64
    sched = cached_scheduler(max_model_len // block_size + (0 if tiny else 200), block_size, max_model_len)
    salts = ("s0", "s1") if salted else ()
    arrivals: dict[int, list] = {}
    expected = {}
    for i, (t, which, plen, slen, mt, forked) in enumerate(workload):
        prompt = [(which * 31 + j * 7) % VOCAB for j in range(plen)] + [(i * 13 + j) % VOCAB for j in range(slen)]
        mt = min(mt, max_model_len - len(prompt))
        salt = salts[i % 2] if salted else None
        arrivals.setdefault(t, []).append(make_request(f"r{i}", prompt, mt, seed=seed, cache_salt=salt))
        expected[f"r{i}"] = expected_output(prompt, mt, seed)
        if forked:
            arrivals[t].append(make_request(f"r{i}#1", prompt, mt, seed=seed + 1, cache_salt=salt, fork_from=f"r{i}"))
            expected[f"r{i}#1"] = expected_output(prompt, mt, seed + 1)
    runner = checking(FakeRunner(block_size), sched.kv_cache_manager, salts)
    aborted = f"r{abort}" if f"r{abort}" in expected else None
    if aborted:  # aborted while the fourth step runs (if it has arrived by then)
        execute, calls = runner.execute, itertools.count()

        def execute_then_abort(out):
            result = execute(out)
            if next(calls) == 3:
                sched.finish_request(aborted, RequestStatus.FINISHED_ABORTED)
            return result

        runner.execute = execute_then_abort
    finished, _ = (run_async if use_async else run)(sched, runner, arrivals)
    if aborted:
        expected.pop(aborted)
        finished.pop(aborted, None)  # it may have finished before step 3
    assert finished == expected
    pool = sched.kv_cache_manager.block_pool
    assert pool.num_free_blocks == pool.num_blocks and not sched.requests


def test_shared_prefixes_save_computed_tokens_and_match_caching_off():
    prompts = [[(j * 5) % VOCAB for j in range(24)] + [i + 1, i + 2, i + 3] for i in range(6)]
    computed, results = {}, {}
    for caching in (False, True):
        sched = cached_scheduler(64, 4, caching=caching)
        for i, p in enumerate(prompts):
            sched.add_request(make_request(f"r{i}", p, 8))
        runner = FakeRunner(4)
        execute, tokens = runner.execute, [0]

        def counting(out, execute=execute, tokens=tokens):
            tokens[0] += out.num_scheduled_tokens
            return execute(out)

        runner.execute = counting
        results[caching], _ = run(sched, runner)
        computed[caching] = tokens[0]
    assert results[True] == results[False]
    # The first request computes all 27 prompt tokens; the others hit 24 (6 blocks) and compute 3.
    assert computed[False] - computed[True] == 5 * 24


def test_prefix_tree_is_the_trie_of_cached_prompts():
    sched = cached_scheduler(64, 2)
    system = [9, 8, 7, 6]
    for i, tail in enumerate([[1, 2, 3, 4], [1, 2, 5, 6], [3, 3, 3, 3]]):
        sched.add_request(make_request(f"r{i}", system + tail + [0], 1))
    run(sched, FakeRunner(2))
    tree = build_prefix_tree(sched.kv_cache_manager.block_pool)
    assert [(n.token_ids, n.evictable) for n in tree.children] == [(system, True)]
    branches = tree.children[0].children
    assert sorted(n.token_ids for n in branches) == [[1, 2], [3, 3, 3, 3]]
    assert sorted(c.token_ids for n in branches for c in n.children) == [[3, 4], [5, 6]]
    assert len(tree.walk()) == 5
    assert tree.render().splitlines()[0] == "(root) 7 cached blocks"


# ---- the engine -----------------------------------------------------------------------------------
def test_engine_outputs_equal_without_caching_greedy_seeded_n_and_under_eviction(tiny_checkpoint):
    folder = str(tiny_checkpoint("qwen3"))
    system = [(11 * j) % 500 + 3 for j in range(21)]
    prompts = [{"prompt_token_ids": system + [(5 * i + j) % 500 + 3 for j in range(2 + 3 * i)]} for i in range(6)]
    params = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=7, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.9, n=3, seed=11, max_tokens=8, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.8, seed=3, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
    ]

    def outputs(outs):
        return [[c.token_ids for c in o.outputs] for o in outs]

    base = LLM(folder, milestone="M4", max_model_len=64, kv_cache_memory=2**22, block_size=4)
    expected = outputs(base.generate(prompts, params, use_tqdm=False))
    per_block = 4 * 2 * 2 * 2 * 32 * 4  # block_size * (K, V) * layers * kv heads * head_dim * fp32
    for blocks in (1024, 30):  # roomy, then so tight that cached blocks are evicted while requests run
        llm = LLM(folder, milestone="M6", max_model_len=64, kv_cache_memory=blocks * per_block, block_size=4)
        for _ in range(2):  # the second pass hits what the first one cached (or what survived)
            assert outputs(llm.generate(prompts, params, use_tqdm=False)) == expected
        stats = llm.llm_engine.prefix_cache_stats
        assert stats.hits > 0
        if blocks == 30:
            assert stats.evictions > 0


def test_engine_reports_cached_tokens_stats_salt_and_reset(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint("llama")), milestone="M6", max_model_len=64, kv_cache_memory=2**22, block_size=4)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompt = [(3 * j) % 500 + 3 for j in range(18)]
    first = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    again = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    salted = llm.generate({"prompt_token_ids": prompt, "cache_salt": "bob"}, params, use_tqdm=False)[0]
    assert (first.num_cached_tokens, again.num_cached_tokens, salted.num_cached_tokens) == (0, 16, 0)
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == salted.outputs[0].token_ids
    text = " ".join(f"w{t}" for t in prompt)
    by_text = llm.generate({"prompt": text, "cache_salt": "bob"}, params, use_tqdm=False)[0]
    assert by_text.num_cached_tokens == 16 and by_text.prompt == text  # the tokenizer gives the same ids
    stats = engine.prefix_cache_stats
    assert (stats.requests, stats.queries, stats.hits) == (4, 72, 32)
    assert stats.hit_rate == pytest.approx(32 / 72)
    assert llm.reset_prefix_cache()
    assert llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].num_cached_tokens == 0
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string, got ''"):
        llm.generate({"prompt_token_ids": prompt, "cache_salt": ""}, params, use_tqdm=False)
    engine.add_request("busy", {"prompt_token_ids": prompt}, params)
    engine.step()
    assert not llm.reset_prefix_cache()  # refused while a request holds blocks
    engine.abort_request("busy")
    with pytest.raises(ValueError, match="enable_prefix_caching=True needs kv_layout='paged', got 'contiguous'"):
        CacheConfig(kv_layout="contiguous", enable_prefix_caching=True)
