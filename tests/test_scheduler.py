"""Scheduler + KV managers driven by a fake runner that really reads through the block tables.

The fake "model" stores each token id in its KV slot (block_id * block_size + offset)
and predicts the next token from the context it reads back *through the block
table*. Wrong slot mappings, block tables, copy-on-write or preemption bookkeeping
therefore change the outputs, which the tests compare against running alone.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from folovllm.config import SchedulerConfig
from folovllm.core.kv_cache_manager import (ContiguousKVCacheManager, KVCacheManager,
                                            NoKVCacheManager)
from folovllm.core.sched.scheduler import Scheduler
from folovllm.outputs import ModelRunnerOutput
from folovllm.request import Request, RequestStatus
from folovllm.sampling_params import SamplingParams

VOCAB = 97


def next_token(context: list[int], seed: int) -> int:
    h = seed
    for t in context:
        h = (h * 31 + t + 7) % 1_000_003
    return h % VOCAB


class FakeRunner:
    """Keeps its own block tables from the scheduler's changes only (as the real runner does)."""

    def __init__(self, block_size: int, uses_cache: bool = True) -> None:
        self.block_size, self.uses_cache = block_size, uses_cache
        self.slots: dict[int, int] = {}
        self.tables: dict[str, list[int]] = {}

    def execute(self, sched_out) -> ModelRunnerOutput:
        for rid in sched_out.finished_req_ids + sched_out.preempted_req_ids:
            self.tables.pop(rid, None)
        for s in sched_out.scheduled:
            if s.block_offset:
                assert s.req_id in self.tables, "a table change for a request the runner never saw"
            self.tables[s.req_id] = self.tables.get(s.req_id, [])[:s.block_offset] + s.new_block_ids
        for src, dst in sched_out.block_copies:
            for off in range(self.block_size):
                if src * self.block_size + off in self.slots:
                    self.slots[dst * self.block_size + off] = self.slots[src * self.block_size + off]
        tokens = []
        for s in sched_out.scheduled:
            if self.uses_cache:
                table = self.tables[s.req_id]
                for i, tok in enumerate(s.token_ids):
                    pos = s.start_pos + i
                    self.slots[table[pos // self.block_size] * self.block_size + pos % self.block_size] = tok
                seq_len = s.start_pos + s.num_tokens
                context = [self.slots[table[p // self.block_size] * self.block_size + p % self.block_size]
                           for p in range(seq_len)]
            else:
                assert s.start_pos == 0
                context = s.token_ids
            seed = s.sampling_params.seed or 0
            tokens.append(next_token(context, seed) if s.sample else None)
        return ModelRunnerOutput(tokens, [None] * len(tokens))


def make_request(rid: str, prompt: list[int], max_tokens: int, seed: int = 0, **kw) -> Request:
    return Request(request_id=rid, prompt_token_ids=prompt, max_tokens=max_tokens,
                   sampling_params=SamplingParams(max_tokens=max_tokens, seed=seed, ignore_eos=True), **kw)


def expected_output(prompt: list[int], max_tokens: int, seed: int = 0) -> list[int]:
    seq = list(prompt)
    for _ in range(max_tokens):
        seq.append(next_token(seq, seed))
    return seq[len(prompt):]


def run(scheduler: Scheduler, runner: FakeRunner, arrivals: dict[int, list[Request]] | None = None,
        max_steps: int = 20_000) -> tuple[dict[str, list[int]], int]:
    """Drive the scheduler; returns outputs of finished requests and the number of steps."""
    arrivals = arrivals or {}
    finished: dict[str, list[int]] = {}
    tracked: dict[str, Request] = {}
    step = 0
    while scheduler.has_unfinished_requests() or any(k >= step for k in arrivals):
        for req in arrivals.get(step, []):
            scheduler.add_request(req)
            tracked[req.request_id] = req
        out = scheduler.schedule()
        cfg = scheduler.config
        assert out.num_scheduled_tokens <= cfg.max_num_batched_tokens
        assert len(out.scheduled) <= (1 if cfg.batching == "sequential" else cfg.max_num_seqs)
        assert len({s.req_id for s in out.scheduled}) == len(out.scheduled)
        updated = scheduler.update_from_output(out, runner.execute(out))
        for req in updated:
            if req.is_finished:
                assert req.request_id not in finished, "finished twice"
                finished[req.request_id] = list(req.output_token_ids)
        step += 1
        assert step < max_steps, "starvation: the workload never finished"
    return finished, step


def make_scheduler(kind: str, num_blocks: int, block_size: int, max_model_len: int, batching="continuous",
                   max_num_seqs=8, budget=None, policy="fcfs") -> Scheduler:
    kv = {"paged": lambda: KVCacheManager(num_blocks, block_size),
          "contiguous": lambda: ContiguousKVCacheManager(num_blocks, block_size, max_model_len),
          "none": NoKVCacheManager}[kind]()
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget or max_model_len,
                          batching=batching, policy=policy)
    return Scheduler(cfg, kv, max_model_len, recompute_each_step=kind == "none")


workloads = st.lists(st.tuples(st.integers(0, 6),            # arrival step
                               st.integers(1, 40),           # prompt length
                               st.integers(1, 24)),          # max tokens
                     min_size=1, max_size=10)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=workloads, kind=st.sampled_from(["paged", "contiguous"]),
       batching=st.sampled_from(["sequential", "static", "continuous"]),
       block_size=st.sampled_from([1, 4, 16]), tiny=st.booleans(), seed=st.integers(0, 3))
def test_random_workloads_finish_once_with_correct_outputs(workload, kind, batching, block_size, tiny, seed):
    max_model_len = 64
    per_slab = -(-max_model_len // block_size)
    num_blocks = per_slab if tiny else per_slab * 4
    sched = make_scheduler(kind, num_blocks, block_size, max_model_len, batching)
    arrivals: dict[int, list[Request]] = {}
    expected = {}
    for i, (t, plen, mt) in enumerate(workload):
        prompt = [(i * 13 + j * 7) % VOCAB for j in range(plen)]
        arrivals.setdefault(t, []).append(make_request(f"r{i}", prompt, mt, seed=seed))
        expected[f"r{i}"] = expected_output(prompt, mt, seed)
    finished, _ = run(sched, FakeRunner(block_size), arrivals)
    assert finished == expected
    if kind == "paged":
        pool = sched.kv_cache_manager.block_pool
        assert pool.num_free_blocks == num_blocks
        assert all(b.ref_cnt == 0 for b in pool.blocks)
    else:
        assert len(sched.kv_cache_manager.free_slabs) == sched.kv_cache_manager.num_slabs


def test_preemption_happens_and_changes_nothing():
    prompts = [[(i + j) % VOCAB for j in range(20)] for i in range(6)]
    sched = make_scheduler("paged", num_blocks=12, block_size=4, max_model_len=64)
    for i, p in enumerate(prompts):
        sched.add_request(make_request(f"r{i}", p, 24))
    finished, _ = run(sched, FakeRunner(4))
    assert sched.num_preemptions > 0
    assert finished == {f"r{i}": expected_output(p, 24) for i, p in enumerate(prompts)}


def test_continuous_batching_takes_fewer_steps_than_static_and_sequential():
    steps = {}
    for batching in ("sequential", "static", "continuous"):
        sched = make_scheduler("paged", num_blocks=256, block_size=4, max_model_len=64, batching=batching)
        for i, mt in enumerate([30, 2, 2, 2, 2, 2, 2, 2, 30, 2]):
            sched.add_request(make_request(f"r{i}", [i + 1] * 5, mt))
        _, steps[batching] = run(sched, FakeRunner(4))
    assert steps["continuous"] < steps["static"] < steps["sequential"]


def test_static_batching_waits_for_the_whole_batch():
    sched = make_scheduler("paged", 256, 4, 64, batching="static", max_num_seqs=2)
    for i, mt in enumerate([5, 1, 1]):
        sched.add_request(make_request(f"r{i}", [1, 2, 3], mt))
    first = sched.schedule()
    assert [s.req_id for s in first.scheduled] == ["r0", "r1"]
    sched.update_from_output(first, FakeRunner(4).execute(first))
    second = sched.schedule()
    assert [s.req_id for s in second.scheduled] == ["r0"]  # r1 finished, r2 still waits


def test_priority_policy_admits_and_preempts_by_priority():
    sched = make_scheduler("paged", 256, 4, 64, policy="priority", max_num_seqs=1)
    sched.add_request(make_request("low", [1, 2], 3, priority=5))
    sched.add_request(make_request("high", [1, 2], 3, priority=0))
    assert [s.req_id for s in sched.schedule().scheduled] == ["high"]


def test_m0_recomputes_the_whole_sequence_every_step():
    sched = make_scheduler("none", 0, 1, 64, batching="sequential")
    sched.add_request(make_request("r", [5, 6, 7], 4))
    lengths = []
    runner = FakeRunner(1, uses_cache=False)
    while sched.has_unfinished_requests():
        out = sched.schedule()
        lengths.append(out.scheduled[0].num_tokens)
        sched.update_from_output(out, runner.execute(out))
    assert lengths == [3, 4, 5, 6]


def test_abort_frees_memory_mid_flight():
    sched = make_scheduler("paged", 64, 4, 64)
    sched.add_request(make_request("a", [1] * 9, 20))
    sched.add_request(make_request("b", [2] * 9, 20))
    runner = FakeRunner(4)
    out = sched.schedule()
    sched.update_from_output(out, runner.execute(out))
    sched.finish_request("a", RequestStatus.FINISHED_ABORTED)
    out = sched.schedule()
    assert [s.req_id for s in out.scheduled] == ["b"]
    assert "a" in out.finished_req_ids
    assert sched.kv_cache_manager.get_block_ids("a") == []


def test_copy_on_write_siblings_share_prompt_blocks_and_match_independent_runs():
    block_size, prompt = 4, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]  # 10 tokens: 2 full blocks + a partial one
    sched = make_scheduler("paged", 64, block_size, 64)
    leader = make_request("p#0", prompt, 6, seed=10)
    sched.add_request(leader)
    for i in range(1, 4):
        sched.add_request(make_request(f"p#{i}", prompt, 6, seed=10 + i, fork_from="p#0"))
    runner = FakeRunner(block_size)
    out = sched.schedule()
    assert [s.req_id for s in out.scheduled] == ["p#0"]  # siblings wait for the leader's prefill
    sched.update_from_output(out, runner.execute(out))
    out = sched.schedule()
    siblings = [s for s in out.scheduled if s.req_id != "p#0"]
    assert [s.num_tokens for s in siblings] == [1, 1, 1]  # only the last prompt token is recomputed
    runner_out = runner.execute(out)
    leader_table = runner.tables["p#0"]
    assert all(runner.tables[s.req_id][:2] == leader_table[:2] for s in siblings)  # full blocks shared
    assert all(s.block_offset == 0 and len(s.new_block_ids) == 3 for s in siblings)  # first sight: whole table
    # The leader is scheduled before the siblings fork, so it still owns the partial block alone and
    # writes in place; each sibling then copies that block before writing its last prompt token.
    assert [src for src, _ in out.block_copies] == [leader_table[2]] * 3
    sched.update_from_output(out, runner_out)
    finished, _ = run(sched, runner)
    assert finished == {f"p#{i}": expected_output(prompt, 6, seed=10 + i) for i in range(4)}
    assert sched.kv_cache_manager.block_pool.num_free_blocks == 64


def test_contiguous_manager_reserves_whole_slabs():
    kv = ContiguousKVCacheManager(num_blocks=10, block_size=4, max_model_len=16)
    assert kv.num_slabs == 2
    a, b, c = (make_request(x, [1] * 5, 3) for x in "abc")
    assert kv.allocate_slots(a, 5) and kv.allocate_slots(b, 5)
    assert not kv.allocate_slots(c, 5)
    usage = kv.usage()
    assert (usage.reserved_slots, usage.live_token_slots) == (32, 10)
    kv.free(a)
    assert kv.allocate_slots(c, 5)
    with pytest.raises(ValueError, match="fewer than one max_model_len slab"):
        ContiguousKVCacheManager(num_blocks=3, block_size=4, max_model_len=16)
