"""Scheduler + KV managers driven by a fake runner that really reads through the block tables.

The fake "model" stores each token id in its KV slot (block_id * block_size + offset)
and predicts the next token from the context it reads back *through the block
table*. Wrong slot mappings, block tables, copy-on-write or preemption bookkeeping
therefore change the outputs, which the tests compare against running alone.
"""

from __future__ import annotations

import itertools
from functools import partial

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from folovllm.config import SchedulerConfig
from folovllm.core.kv_cache_manager import ContiguousKVCacheManager, KVCacheManager, NoKVCacheManager
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

    def __init__(self, block_size: int, uses_cache: bool = True, step_time=None) -> None:
        self.block_size, self.uses_cache = block_size, uses_cache
        self.step_time = step_time  # shapes -> seconds: a made-up device time (dynamic chunk sizing)
        self.slots: dict[int, int] = {}
        self.tables: dict[str, list[int]] = {}
        self.last: dict[str, int] = {}  # the previous step's samples (async scheduling reads them "on device")

    def execute(self, sched_out) -> ModelRunnerOutput:
        for rid in sched_out.finished_req_ids + sched_out.preempted_req_ids:
            self.tables.pop(rid, None)
        for s in sched_out.scheduled:
            if s.block_offset:
                assert s.req_id in self.tables, "a table change for a request the runner never saw"
            self.tables[s.req_id] = self.tables.get(s.req_id, [])[: s.block_offset] + s.new_block_ids
        for src, dst in sched_out.block_copies:
            for off in range(self.block_size):
                if src * self.block_size + off in self.slots:
                    self.slots[dst * self.block_size + off] = self.slots[src * self.block_size + off]
        tokens = []
        for s in sched_out.scheduled:
            ids = list(s.token_ids)
            if len(ids) < s.num_tokens:  # its last token is still in flight: take it from the last step
                assert len(ids) == s.num_tokens - 1, "only one token can be in flight"
                ids.append(self.last[s.req_id])
            if self.uses_cache:
                table = self.tables[s.req_id]
                for i, tok in enumerate(ids):
                    pos = s.start_pos + i
                    self.slots[table[pos // self.block_size] * self.block_size + pos % self.block_size] = tok
                seq_len = s.start_pos + s.num_tokens
                context = [
                    self.slots[table[p // self.block_size] * self.block_size + p % self.block_size] for p in range(seq_len)
                ]
            else:
                assert s.start_pos == 0
                context = ids
            seed = s.sampling_params.seed or 0
            tokens.append(next_token(context, seed) if s.sample else None)
        self.last = {s.req_id: t for s, t in zip(sched_out.scheduled, tokens) if t is not None}
        shapes = [(s.num_tokens, s.start_pos + s.num_tokens) for s in sched_out.scheduled]
        return ModelRunnerOutput(
            tokens, [None] * len(tokens), device_time=self.step_time(shapes) if self.step_time and shapes else None
        )


def make_request(rid: str, prompt: list[int], max_tokens: int, seed: int = 0, eos: int | None = None, **kw) -> Request:
    params = SamplingParams(max_tokens=max_tokens, seed=seed, ignore_eos=eos is None)
    return Request(
        request_id=rid,
        prompt_token_ids=prompt,
        max_tokens=max_tokens,
        sampling_params=params,
        eos_token_ids=() if eos is None else (eos,),
        **kw,
    )


def expected_output(prompt: list[int], max_tokens: int, seed: int = 0, eos: int | None = None) -> list[int]:
    seq = list(prompt)
    for _ in range(max_tokens):
        seq.append(next_token(seq, seed))
        if seq[-1] == eos:
            break
    return seq[len(prompt) :]


def checked_schedule(scheduler: Scheduler):
    """``schedule()`` plus the invariants every step keeps (budget, caps, and that no decode is skipped)."""
    cfg = scheduler.config
    decoding = {r.request_id for r in scheduler.running if scheduler._num_new_tokens(r) == 1}
    out = scheduler.schedule()
    assert out.num_scheduled_tokens <= cfg.max_num_batched_tokens
    assert len(out.scheduled) <= (1 if cfg.batching == "sequential" else cfg.max_num_seqs)
    assert len({s.req_id for s in out.scheduled}) == len(out.scheduled)
    if cfg.long_prefill_token_threshold:
        assert all(s.num_tokens <= cfg.long_prefill_token_threshold for s in out.scheduled)
    # room for every decode: none may wait behind a prefill (static batching's members wait by design)
    if cfg.max_num_batched_tokens >= cfg.max_num_seqs and cfg.batching != "static":
        assert decoding <= {s.req_id for s in out.scheduled} | set(out.preempted_req_ids)
    return out


def run(
    scheduler: Scheduler, runner: FakeRunner, arrivals: dict[int, list[Request]] | None = None, max_steps: int = 20_000
) -> tuple[dict[str, list[int]], int]:
    """Drive the scheduler; returns outputs of finished requests and the number of steps."""
    arrivals = arrivals or {}
    finished: dict[str, list[int]] = {}
    tracked: dict[str, Request] = {}
    step = 0
    while scheduler.has_unfinished_requests() or any(k >= step for k in arrivals):
        for req in arrivals.get(step, []):
            scheduler.add_request(req)
            tracked[req.request_id] = req
        out = checked_schedule(scheduler)
        updated = scheduler.update_from_output(out, runner.execute(out))
        for req in updated:
            if req.is_finished:
                assert req.request_id not in finished, "finished twice"
                finished[req.request_id] = list(req.output_token_ids)
        step += 1
        assert step < max_steps, "starvation: the workload never finished"
    return finished, step


def run_async(
    scheduler: Scheduler,
    runner: FakeRunner,
    arrivals: dict[int, list[Request]] | None = None,
    abort_at: dict[int, str] | None = None,
    max_steps: int = 20_000,
) -> tuple[dict[str, list[int]], int]:
    """``run`` with async scheduling: step n+1 is scheduled and executed before step n's tokens reach
    the scheduler (as ``LLMEngine.step`` does with ``async_scheduling``)."""
    arrivals, abort_at = arrivals or {}, abort_at or {}
    finished: dict[str, list[int]] = {}
    in_flight = None
    step = 0
    while scheduler.has_unfinished_requests() or in_flight or any(k >= step for k in arrivals):
        for req in arrivals.get(step, []):
            scheduler.add_request(req)
        if step in abort_at:
            scheduler.finish_request(abort_at[step], RequestStatus.FINISHED_ABORTED)
        out = checked_schedule(scheduler)
        launched = (out, runner.execute(out))
        if in_flight is not None:
            for req in scheduler.update_from_output(*in_flight):
                if req.is_finished:
                    assert req.request_id not in finished, "finished twice"
                    finished[req.request_id] = list(req.output_token_ids)
        in_flight = launched if out.scheduled else None
        step += 1
        assert step < max_steps, "starvation: the workload never finished"
    return finished, step


def make_scheduler(
    kind: str,
    num_blocks: int,
    block_size: int,
    max_model_len: int,
    batching="continuous",
    max_num_seqs=8,
    budget=None,
    policy="fcfs",
    **chunking,
) -> Scheduler:
    kv = {
        "paged": lambda: KVCacheManager(num_blocks, block_size),
        "contiguous": lambda: ContiguousKVCacheManager(num_blocks, block_size, max_model_len),
        "none": NoKVCacheManager,
    }[kind]()
    cfg = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget or max_model_len,
        batching=batching,
        policy=policy,
        **chunking,
    )
    return Scheduler(cfg, kv, max_model_len, recompute_each_step=kind == "none")


def build_workload(
    workload: list[tuple[int, int, int]], seed: int, eos: int | None = None
) -> tuple[dict[int, list[Request]], dict[str, list[int]]]:
    """(arrival step, prompt length, max tokens) triples -> requests by arrival step, and each one's
    output when run alone."""
    arrivals: dict[int, list[Request]] = {}
    expected = {}
    for i, (t, plen, mt) in enumerate(workload):
        prompt = [(i * 13 + j * 7) % VOCAB for j in range(plen)]
        arrivals.setdefault(t, []).append(make_request(f"r{i}", prompt, mt, seed=seed, eos=eos))
        expected[f"r{i}"] = expected_output(prompt, mt, seed, eos)
    return arrivals, expected


workloads = st.lists(
    st.tuples(
        st.integers(0, 6),  # arrival step
        st.integers(1, 40),  # prompt length
        st.integers(1, 24),
    ),  # max tokens
    min_size=1,
    max_size=10,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    workload=workloads,
    kind=st.sampled_from(["paged", "contiguous"]),
    batching=st.sampled_from(["sequential", "static", "continuous"]),
    block_size=st.sampled_from([1, 4, 16]),
    tiny=st.booleans(),
    seed=st.integers(0, 3),
)
def test_random_workloads_finish_once_with_correct_outputs(workload, kind, batching, block_size, tiny, seed):
    max_model_len = 64
    per_slab = -(-max_model_len // block_size)
    num_blocks = per_slab if tiny else per_slab * 4
    sched = make_scheduler(kind, num_blocks, block_size, max_model_len, batching)
    arrivals, expected = build_workload(workload, seed)
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


def test_static_batch_fills_to_max_num_seqs_across_budget_limited_prefill_steps():
    sched = make_scheduler("paged", 256, 4, 64, batching="static", max_num_seqs=4, budget=20)
    for i in range(6):
        sched.add_request(make_request(f"r{i}", [i + 1] * 10, 3))
    runner = FakeRunner(4)
    steps = []
    while sched.has_unfinished_requests():
        out = sched.schedule()
        steps.append([(s.req_id, s.num_tokens) for s in out.scheduled])
        sched.update_from_output(out, runner.execute(out))
    assert steps[:2] == [[("r0", 10), ("r1", 10)], [("r2", 10), ("r3", 10)]]  # the budget splits the batch's prefill
    assert steps[2:4] == [[(f"r{i}", 1) for i in range(4)]] * 2  # then all four decode together to the end
    assert steps[4] == [("r4", 10), ("r5", 10)]  # the next batch only once the first has finished


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


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    workload=workloads,
    kind=st.sampled_from(["paged", "contiguous"]),
    block_size=st.sampled_from([1, 4, 16]),
    tiny=st.booleans(),
    seed=st.integers(0, 3),
    eos=st.sampled_from([None, 3, 40]),
)
def test_async_scheduling_finishes_every_request_once_with_sync_outputs(workload, kind, block_size, tiny, seed, eos):
    """One token in flight per request: outputs, EOS mid-flight, preemption and memory as without it."""
    max_model_len = 64
    per_slab = -(-max_model_len // block_size)
    sched = make_scheduler(kind, per_slab if tiny else per_slab * 4, block_size, max_model_len)
    arrivals, expected = build_workload(workload, seed, eos)
    finished, _ = run_async(sched, FakeRunner(block_size), arrivals)
    assert finished == expected
    if kind == "paged":
        assert sched.kv_cache_manager.block_pool.num_free_blocks == sched.kv_cache_manager.block_pool.num_blocks
    assert not sched.requests


def test_async_scheduling_never_schedules_past_max_tokens_and_survives_preemption_and_abort():
    prompts = [[(i + j) % VOCAB for j in range(20)] for i in range(6)]
    sched = make_scheduler("paged", num_blocks=12, block_size=4, max_model_len=64)
    for i, p in enumerate(prompts):
        sched.add_request(make_request(f"r{i}", p, 24))
    sched.add_request(make_request("gone", prompts[0], 24))
    runner = FakeRunner(4)
    computed: dict[str, int] = {}
    original = runner.execute

    def counting(out):
        for s in out.scheduled:
            computed[s.req_id] = s.start_pos + s.num_tokens
        return original(out)

    runner.execute = counting
    finished, _ = run_async(sched, runner, abort_at={3: "gone"})
    assert sched.num_preemptions > 0
    assert finished == {f"r{i}": expected_output(p, 24) for i, p in enumerate(prompts)}
    # the last token's KV is never computed: a request stops when its 24th token is sampled
    assert all(computed[f"r{i}"] == 20 + 24 - 1 for i in range(6))
    assert sched.kv_cache_manager.block_pool.num_free_blocks == 12


# ---- M5: chunked prefill ------------------------------------------------------------------------
def chunked(
    kind: str, num_blocks: int, block_size: int, max_model_len: int, budget: int, threshold: int = 0, **kw
) -> Scheduler:
    return make_scheduler(
        kind,
        num_blocks,
        block_size,
        max_model_len,
        budget=budget,
        enable_chunked_prefill=True,
        long_prefill_token_threshold=threshold,
        **kw,
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    workload=workloads,
    kind=st.sampled_from(["paged", "contiguous"]),
    block_size=st.sampled_from([1, 4, 16]),
    tiny=st.booleans(),
    seed=st.integers(0, 3),
    eos=st.sampled_from([None, 3, 40]),
    budget=st.integers(1, 24),
    threshold=st.sampled_from([0, 1, 5]),
    asynchronous=st.booleans(),
)
def test_chunked_workloads_finish_once_with_unchunked_outputs(
    workload, kind, block_size, tiny, seed, eos, budget, threshold, asynchronous
):
    """Budgets down to one token per step, sync and async: the outputs of running each request alone,
    every request finished once, no decode skipped while there is room, all memory back."""
    max_model_len = 64
    per_slab = -(-max_model_len // block_size)
    sched = chunked(kind, per_slab if tiny else per_slab * 4, block_size, max_model_len, budget, threshold)
    arrivals, expected = build_workload(workload, seed, eos)
    finished, _ = (run_async if asynchronous else run)(sched, FakeRunner(block_size), arrivals)
    assert finished == expected
    if kind == "paged":
        assert sched.kv_cache_manager.block_pool.num_free_blocks == sched.kv_cache_manager.block_pool.num_blocks
    else:
        assert len(sched.kv_cache_manager.free_slabs) == sched.kv_cache_manager.num_slabs
    assert not sched.requests


def test_decodes_get_a_token_every_step_while_a_long_prompt_is_prefilled():
    sched = chunked("paged", 64, 4, 128, budget=8)
    runner = FakeRunner(4)
    shorts = [make_request(f"s{i}", [i + 1] * 3, 40) for i in range(3)]
    long = make_request("long", [(7 * j) % VOCAB for j in range(100)], 5)
    arrivals = {0: shorts, 2: [long]}
    steps = []
    original = runner.execute
    runner.execute = lambda out: steps.append({s.req_id: s.num_tokens for s in out.scheduled}) or original(out)
    finished, _ = run(sched, runner, arrivals)
    assert finished == {r.request_id: expected_output(r.prompt_token_ids, r.max_tokens) for r in shorts + [long]}
    prefill_steps = [i for i, s in enumerate(steps) if "long" in s and s["long"] > 1]
    assert len(prefill_steps) == -(-100 // 5)  # 8 tokens a step, 3 of them the decodes
    for i in prefill_steps:
        assert steps[i] == {"s0": 1, "s1": 1, "s2": 1, "long": 5}


@pytest.mark.parametrize("prompt_len", [7, 8, 9, 16, 17, 24])
@pytest.mark.parametrize("asynchronous", [False, True])
def test_prompts_at_budget_and_block_boundaries(prompt_len, asynchronous):
    """Budget 8, blocks of 4: chunks of 8 then the rest, the token sampled on the last chunk only."""
    sched = chunked("paged", 16, 4, 64, budget=8)
    runner = FakeRunner(4)
    seen = []
    original = runner.execute
    runner.execute = lambda out: seen.extend((s.num_tokens, s.sample) for s in out.scheduled) or original(out)
    prompt = [(3 * j + 1) % VOCAB for j in range(prompt_len)]
    finished, _ = (run_async if asynchronous else run)(sched, runner, {0: [make_request("r", prompt, 3)]})
    assert finished == {"r": expected_output(prompt, 3)}
    chunks = [8] * (prompt_len // 8) + ([prompt_len % 8] if prompt_len % 8 else [])
    assert seen == [(n, i == len(chunks) - 1) for i, n in enumerate(chunks)] + [(1, True)] * 2
    assert sched.kv_cache_manager.block_pool.num_free_blocks == 16


@pytest.mark.parametrize("asynchronous", [False, True])
def test_preempting_a_partly_prefilled_request_recomputes_it(asynchronous):
    sched = chunked("paged", 12, 4, 64, budget=5)
    preempted_at = []
    original = sched._preempt
    sched._preempt = lambda req: preempted_at.append((req.request_id, req.num_computed_tokens)) or original(req)
    a = make_request("a", [(5 * j) % VOCAB for j in range(8)], 32)
    b = make_request("b", [(3 * j + 2) % VOCAB for j in range(30)], 4)
    finished, _ = (run_async if asynchronous else run)(sched, FakeRunner(4), {0: [a], 1: [b]})
    assert finished == {"a": expected_output(a.prompt_token_ids, 32), "b": expected_output(b.prompt_token_ids, 4)}
    assert any(rid == "b" and 0 < computed < 30 for rid, computed in preempted_at)
    assert sched.kv_cache_manager.block_pool.num_free_blocks == 12


@pytest.mark.parametrize("asynchronous", [False, True])
def test_abort_mid_prefill_frees_its_blocks(asynchronous):
    sched = chunked("paged", 64, 4, 64, budget=6)
    a = make_request("a", [1, 2, 3], 10)
    b = make_request("b", [(3 * j) % VOCAB for j in range(40)], 10)
    runner = FakeRunner(4)
    partial = []
    original = runner.execute
    runner.execute = lambda out: (
        partial.extend(s.start_pos + s.num_tokens for s in out.scheduled if s.req_id == "b") or original(out)
    )
    finished, _ = (
        (run_async if asynchronous else run)(sched, runner, {0: [a, b]}, abort_at={4: "b"})
        if asynchronous
        else _run_with_abort(sched, runner, {0: [a, b]}, 4, "b")
    )
    assert finished == {"a": expected_output([1, 2, 3], 10)}
    assert partial and max(partial) < 40  # aborted while its prompt was half in the cache
    assert sched.kv_cache_manager.block_pool.num_free_blocks == 64 and not sched.requests


def _run_with_abort(sched: Scheduler, runner: FakeRunner, arrivals, at: int, rid: str):
    """``run`` that aborts ``rid`` before step ``at``."""
    for req in arrivals[0]:
        sched.add_request(req)
    for _ in range(at):
        out = checked_schedule(sched)
        sched.update_from_output(out, runner.execute(out))
    sched.finish_request(rid, RequestStatus.FINISHED_ABORTED)
    return run(sched, runner)


def test_forks_wait_for_the_last_chunk_then_share_the_prompt():
    block_size, prompt = 4, [(11 * j + 3) % VOCAB for j in range(22)]
    sched = chunked("paged", 64, block_size, 64, budget=6)
    sched.add_request(make_request("p#0", prompt, 6, seed=10))
    for i in range(1, 4):
        sched.add_request(make_request(f"p#{i}", prompt, 6, seed=10 + i, fork_from="p#0"))
    runner = FakeRunner(block_size)
    first_seen = {}
    original = runner.execute

    def record(out):
        for s in out.scheduled:
            first_seen.setdefault(s.req_id, (s.start_pos, s.num_tokens))
        return original(out)

    runner.execute = record
    finished, _ = run(sched, runner)
    assert finished == {f"p#{i}": expected_output(prompt, 6, seed=10 + i) for i in range(4)}
    assert first_seen["p#0"] == (0, 6)
    assert all(first_seen[f"p#{i}"] == (21, 1) for i in range(1, 4))  # forked: only the last prompt token
    assert sched.kv_cache_manager.block_pool.num_free_blocks == 64


def linear_step_time(shapes) -> float:
    """A made-up device: 2 ms a step, 10 us a token, 0.1 us per context token, 10 ns per (query, key) pair."""
    return 2e-3 + sum(1e-5 * q + 1e-7 * seq + 1e-8 * q * seq for q, seq in shapes)


def eager_step_time(shapes) -> float:
    """A GPU-like device: decode-only steps replay a CUDA graph; a step with any prefill runs the eager forward
    and pays 12 ms more, whatever its size."""
    return linear_step_time(shapes) + (12e-3 if any(q > 1 for q, _ in shapes) else 0.0)


def run_timed(
    target_itl_ms: float | None, step_time, step_sizes: tuple[int, ...] = (), shapes: list | None = None
) -> tuple[Scheduler, list[float]]:
    """Four decoders and 600-token prompts arriving now and then, on a made-up device; every step's time (and,
    into ``shapes``, every step's (new tokens, prompt tokens left after it) per request)."""
    prompts = [[(j * (i + 3)) % VOCAB for j in range(600)] for i in range(4)]
    arrivals = {
        0: [make_request(f"d{i}", [i + 1] * 4, 120) for i in range(4)],
        **{t: [make_request(f"p{i}", p, 4)] for i, (t, p) in enumerate(zip((3, 30, 50, 70), prompts))},
    }
    sched = chunked("paged", 512, 16, 1024, budget=256, target_itl_ms=target_itl_ms)
    sched.step_sizes = list(step_sizes)  # what the engine passes from its mixed-step graphs
    runner = FakeRunner(16, step_time=step_time)
    measured = []
    original = runner.execute

    def timed(out):
        result = original(out)
        measured.append(result.device_time)
        if shapes is not None:
            left = [sched.requests[s.req_id].num_prompt_tokens - s.start_pos - s.num_tokens for s in out.scheduled]
            shapes.append([(s.num_tokens, n) for s, n in zip(out.scheduled, left)])
        return result

    runner.execute = timed
    finished, _ = run(sched, runner, arrivals)
    assert finished == {
        r.request_id: expected_output(r.prompt_token_ids, r.max_tokens) for reqs in arrivals.values() for r in reqs
    }
    return sched, measured


def test_dynamic_chunk_sizing_holds_the_target_a_fixed_budget_misses():
    """A 256-token budget overshoots a 4 ms target; the cost model learns the made-up device from the first
    prompt's steps and sizes every chunk after that to fit."""
    _, fixed = run_timed(None, linear_step_time)
    sched, dynamic = run_timed(4.0, linear_step_time)
    assert sched.cost_model.coef == pytest.approx([2e-3, 0.0, 1e-5, 1e-7, 1e-8], rel=1e-6, abs=1e-12)
    assert max(fixed) > 4e-3
    warm = dynamic[30:]  # fitted from the first prompt's steps
    assert max(warm) <= 4e-3
    assert sum(t > 3.5e-3 for t in warm) >= 10  # and the chunks fill the target, not a token less than needed
    assert sched.num_target_out_of_reach == 0


def test_dynamic_chunk_sizing_fills_the_captured_size_a_step_pads_to():
    """With mixed-step graphs captured at 16, 32, 64, ... tokens a step pads up to the next size; the dynamic mode
    fills that padding with prompt tokens instead (a padded row costs a token's linear work and carries nothing),
    so every step whose prompts had tokens left lands on a size, and outputs do not change."""
    sizes = (16, 32, 64, 128, 192, 256)
    unfilled, filled = [], []
    run_timed(4.0, linear_step_time, shapes=unfilled)
    run_timed(4.0, linear_step_time, sizes, shapes=filled)

    def chunked_steps(steps):
        return [st for st in steps if any(q > 1 for q, _ in st) and any(left > 0 for q, left in st if q > 1)]

    totals = [sum(q for q, _ in st) for st in chunked_steps(filled)]
    assert totals and all(t in sizes for t in totals)
    assert sum(sum(q for q, _ in st) not in sizes for st in chunked_steps(unfilled)) >= 10  # it padded before


def test_dynamic_chunk_sizing_prices_the_eager_step_and_gives_up_a_target_out_of_reach(caplog):
    """With a 12 ms cost for any step that carries a prefill, a 20 ms target is held by smaller chunks; a 10 ms
    target cannot be held by any mixed step, so the token budget sizes the chunks (no prompt is starved), and
    the engine says so once."""
    sched, held = run_timed(20.0, eager_step_time)
    assert sched.cost_model.coef == pytest.approx([2e-3, 12e-3, 1e-5, 1e-7, 1e-8], rel=1e-6, abs=1e-12)
    assert max(held[30:]) <= 20e-3 and sched.num_target_out_of_reach == 0
    _, fixed = run_timed(None, eager_step_time)
    with caplog.at_level("WARNING", logger="folovllm.core.sched.scheduler"):
        sched, given_up = run_timed(10.0, eager_step_time)
    assert sched.num_target_out_of_reach > 0
    assert [r.getMessage() for r in caplog.records] == [
        "target_itl_ms=10 is below what any step carrying a prompt costs here (14.0 ms by the fitted model): "
        "prompt chunks fall back to max_num_batched_tokens"
    ]
    mixed = [t for t in given_up[30:] if t > 14e-3 - 1e-9]  # every step with a prefill is over 10 ms
    assert len(mixed) <= len([t for t in fixed[30:] if t > 14e-3 - 1e-9])  # no more of them than the fixed budget


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"long_prefill_token_threshold": 8}, "long_prefill_token_threshold needs enable_chunked_prefill=True"),
        ({"target_itl_ms": 20.0}, "target_itl_ms needs enable_chunked_prefill=True"),
        ({"enable_chunked_prefill": True, "target_itl_ms": 0}, "target_itl_ms must be a positive number"),
        (
            {"enable_chunked_prefill": True, "long_prefill_token_threshold": -1},
            "long_prefill_token_threshold must be a non-negative integer",
        ),
        ({"enable_chunked_prefill": "yes"}, "enable_chunked_prefill must be a bool"),
        ({"enable_chunked_prefill": True, "batching": "static"}, "enable_chunked_prefill needs batching='continuous'"),
    ],
)
def test_chunking_options_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SchedulerConfig(**kwargs)


def test_cost_model_keeps_its_last_full_fit_through_decode_only_stretches_and_never_raises():
    """On the H200 a window of decode-only steps left the prefill column all zero; scaled by its maximum it
    became NaN and least squares raised inside the scheduler (requests failed). Such a window is rank-deficient:
    the model is not ready until it has seen a full window once, and afterwards keeps that fit through
    decode-only stretches (dropping it sized the next prompt by the token budget alone: one whole-budget
    chunk, the H200's p99 ITL outliers of the dynamic mode)."""
    from folovllm.core.sched.cost_model import StepCostModel

    model = StepCostModel(window=16, min_samples=8)

    def decode(i: int) -> list[tuple[int, int]]:
        return [(1, 200 + 7 * i + 13 * j) for j in range(1 + i % 4)]

    def mixed(i: int) -> list[tuple[int, int]]:
        return decode(i) + [(64 + 8 * i, 500 + 50 * i)]

    for i in range(16):  # only decodes: rank-deficient from the start
        model.observe(decode(i), linear_step_time(decode(i)))
    assert not model.ready
    for i in range(12):
        for shapes in (decode(i), mixed(i)):
            model.observe(shapes, 2 * linear_step_time(shapes))  # a first, slower regime
    assert model.ready and model.coef == pytest.approx([4e-3, 0.0, 2e-5, 2e-7, 2e-8], rel=1e-6, abs=1e-12)
    fits = []
    for i in range(16):  # only decodes: the prefill column leaves the window; refitted every step, as the
        model.observe(decode(i), linear_step_time(decode(i)))  # scheduler does, the last full fit stays
        fits.append(model.coef.copy())
    assert model.ready and np.array_equal(fits[-1], fits[-2])  # the all-decode window kept the fit before it
    assert model.predict(mixed(0)) > model.predict(decode(0)) > 0
    for i in range(6):
        model.observe(mixed(i), linear_step_time(mixed(i)))
    assert model.ready and model.coef == pytest.approx([2e-3, 0.0, 1e-5, 1e-7, 1e-8], rel=1e-6, abs=1e-12)


def test_cost_model_leaves_out_a_stall_but_learns_a_slower_device():
    """A JIT compile mid-run (750 ms against ~10 ms steps on the H200) is no property of a step's shape; four
    slow steps in a row are the device changing."""
    from folovllm.core.sched.cost_model import StepCostModel

    model = StepCostModel(window=32, min_samples=8)

    def shapes(i: int) -> list[tuple[int, int]]:
        return [(1, 100 + 5 * i)] * (1 + i % 3) + ([(32 + i, 300 + 9 * i)] if i % 2 else [])

    for i in range(20):
        model.observe(shapes(i), linear_step_time(shapes(i)))
    fitted = model.coef.copy()
    model.observe(shapes(3), 0.75)  # the stall
    assert model.num_outliers == 1 and np.array_equal(model.coef, fitted)
    model.observe(shapes(20), linear_step_time(shapes(20)))
    for i in range(21, 25):  # a device 100x slower, four steps running
        model.observe(shapes(i), 100 * linear_step_time(shapes(i)))
    assert model.num_outliers == 4 and model.num_samples == 22  # three left out, the fourth learned


def test_cost_model_window_gives_the_fit_its_inputs_back():
    """What ``bench serve`` records to diagnose a fit: each kept step's features, seconds and how they were
    measured, in order, and the fit's prediction for each (exact on a noiseless linear device); a stall left out
    of the fit is left out of the window too."""
    from folovllm.core.sched.cost_model import StepCostModel

    model = StepCostModel(window=8, min_samples=5)
    assert model.window() == {"features": [], "seconds": [], "measured_as": [], "predicted": None}
    steps = [[(1, 100 + 7 * i)] * (1 + i % 3) + ([(16 * i, 40 * i)] if i % 2 else []) for i in range(1, 11)]
    for i, shapes in enumerate(steps):
        model.observe(shapes, linear_step_time(shapes), "interval" if i == 9 else "device")
    model.observe(steps[0], 1.0)  # a stall
    window = model.window()
    assert window["features"] == [StepCostModel.features(sh).tolist() for sh in steps[2:]]  # the last 8
    assert window["seconds"] == [linear_step_time(sh) for sh in steps[2:]]
    assert window["measured_as"] == ["device"] * 7 + ["interval"]
    assert window["predicted"] == pytest.approx(window["seconds"], rel=1e-9)


def test_dynamic_sizing_learns_the_gap_between_tokens_not_only_the_forward():
    """With a device that waits for the host between steps, what a running request sees is the step
    interval; after an idle engine the interval spans the idle time and the forward alone is used."""
    sched = chunked("paged", 64, 16, 256, budget=64, target_itl_ms=50.0)
    seen = []
    sched.cost_model.observe = lambda shapes, seconds, measured_as: seen.append((seconds, measured_as))

    def step(interval: float | None) -> None:
        out = sched.schedule()
        n = len(out.scheduled)
        sched.update_from_output(out, ModelRunnerOutput([5] * n, [None] * n, device_time=0.004, step_interval=interval))

    sched.add_request(make_request("once", [1, 2, 3], 1))
    step(None)  # finishes: the engine is idle after it
    sched.add_request(make_request("r", [1, 2, 3], 8))
    step(0.5)  # the interval spans the idle time: the forward alone
    step(0.009)  # back to back: the device waited 5 ms for the host
    step(0.002)  # a shorter interval than the forward (overlapped clocks): the forward
    assert seen == [(0.004, "device"), (0.004, "device"), (0.009, "interval"), (0.004, "device")]


def test_runner_reports_the_interval_between_timed_steps_on_cpu():
    """On CPU a timed step runs inside ``launch_step``; the interval is from one timed step's end to the next."""
    from types import SimpleNamespace

    from folovllm.worker.model_runner import ModelRunner, StepInFlight

    runner = SimpleNamespace(_previous_end=None)
    interval = partial(ModelRunner._interval_since_previous, runner)
    empty = StepInFlight(sched=None, rows=[])
    assert interval(StepInFlight(sched=None, rows=[], ended_at=1.0)) is None  # the first: nothing before it
    assert interval(empty) is None and runner._previous_end == 1.0  # an untimed step changes nothing
    assert interval(StepInFlight(sched=None, rows=[], ended_at=1.25)) == 0.25


def test_dynamic_sizing_aims_below_the_target_by_how_much_slower_than_predicted_steps_run(monkeypatch):
    """Every fifth prompt-carrying step runs 25% slower than its shape says (the H200's prompt steps at a
    20 ms target: median 20.5 ms, p99 23.9 ms). Sized by the fit alone, those steps overshoot the target;
    with the tail factor steered by the first prompts' slow steps, the later ones stay under it."""
    from folovllm.core.sched.cost_model import StepCostModel

    def noisy_device():
        count = itertools.count()

        def step_time(shapes) -> float:
            slow = any(q > 1 for q, _ in shapes) and next(count) % 5 == 0
            return linear_step_time(shapes) * (1.25 if slow else 1.0)

        return step_time

    sched, tail = run_timed(4.0, noisy_device())
    assert 1.25 / 1.1 <= sched.cost_model.tail_factor <= 1.25 * 1.1  # about the slow steps' 1.25
    monkeypatch.setattr(StepCostModel, "TAIL_GAIN", 0.0)  # the fit alone (the factor stays 1)
    sched, typical = run_timed(4.0, noisy_device())
    assert sched.cost_model.tail_factor == 1.0
    later = slice(60, None)  # from the third prompt on
    assert max(typical[later]) > 4.5e-3 and max(tail[later]) <= 4e-3
    assert sum(t > 2.75e-3 for t in tail[later]) >= 8  # the chunks still fill most of the aim (~3.1 ms)
