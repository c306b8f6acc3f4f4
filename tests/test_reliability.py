"""Reliability (#10): no input can poison, hang or corrupt the engine.

First, each finding of the issue's adversarial run as a named regression test. Then hypothesis
properties over ``SamplingParams``, prompts and engine call sequences (add, step, abort, generate,
with request ids drawn to collide) on tiny models, M1-M4: every call either succeeds with the output
a one-at-a-time run gives, or raises ``ValueError`` (``InvalidTypeError`` for a wrong type) naming the
field before anything is queued or computed; afterwards the same ``LLM`` serves a good request
correctly with every KV block back in the pool; and no call runs more steps than its tokens bound.
"""

from __future__ import annotations

import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_scheduler import FakeRunner, expected_output, make_request, run

from folovllm import LLM, InvalidTypeError, SamplingParams
from folovllm.config import SchedulerConfig
from folovllm.core.kv_cache_manager import KVCacheManager
from folovllm.core.sched.scheduler import Scheduler
from folovllm.request import Request
from folovllm.sampling_params import FLOAT32_MAX, INT64_MAX, INT64_MIN, MAX_N, RequestOutputKind
from folovllm.utils import cdiv

MAX_LEN, BLOCK, POOL_BLOCKS, VOCAB, MAX_LOGPROBS = 64, 4, 10, 512, 20
KV_BYTES_PER_TOKEN = {"llama": 512, "random:tiny-llama": 512, "random:tiny-qwen3": 1024}  # fp32, 2 layers
# CI replays the same examples every run (derandomize); locally hypothesis explores new ones.
PROFILE = dict(
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def make_llm(model: str, milestone: str) -> LLM:
    """Paged presets get a pool of 10 blocks (40 tokens) < max_model_len, so admission has work to refuse."""
    if milestone in ("M3", "M4"):
        memory = POOL_BLOCKS * BLOCK * KV_BYTES_PER_TOKEN[model if model.startswith("random:") else "llama"]
        return LLM(model, milestone=milestone, max_model_len=MAX_LEN, block_size=BLOCK, kv_cache_memory=memory)
    return LLM(model, milestone=milestone, max_model_len=MAX_LEN, kv_cache_memory=2 * MAX_LEN * 1024)


def kv_all_free(llm: LLM) -> bool:
    engine = llm.llm_engine
    kv = engine.kv_cache_manager
    free = (
        kv.block_pool.num_free_blocks == kv.num_blocks
        if isinstance(kv, KVCacheManager)
        else len(kv.free_slabs) == kv.num_slabs
    )
    return free and not kv.num_tokens and not engine.scheduler.requests and not engine.parents


def ids_of(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


GOOD = {"prompt_token_ids": [5, 6, 7]}
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def m3(tiny_checkpoint) -> LLM:
    return fresh(make_llm(str(tiny_checkpoint("llama")), "M3"))


@pytest.fixture(scope="module")
def m3_no_tokenizer() -> LLM:
    return fresh(make_llm("random:tiny-llama", "M3"))


GOOD_OUTPUT: dict[int, list] = {}  # id(llm) -> GOOD's output on that LLM before any test touched it


def fresh(llm: LLM) -> LLM:
    GOOD_OUTPUT[id(llm)] = ids_of(llm.generate(GOOD, GREEDY, use_tqdm=False))
    return llm


def assert_untouched(llm: LLM, call, error: type[Exception], match: str) -> None:
    """``call`` raises ``error`` matching ``match``, computes nothing, and the engine then serves GOOD."""
    engine = llm.llm_engine
    steps = engine.stats.num_steps
    with pytest.raises(error, match=match):
        call()
    assert engine.stats.num_steps == steps and kv_all_free(llm)
    assert ids_of(llm.generate(GOOD, GREEDY, use_tqdm=False)) == GOOD_OUTPUT[id(llm)] and kv_all_free(llm)


# ---- the findings, one test each ---------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seed": 2**64, "temperature": 1.0}, r"seed must be an integer in \[-2\*\*63, 2\*\*63 - 1\] or None, got "),
        ({"top_k": 2**63}, r"top_k must be an integer in \[-1, 2\*\*63 - 1\], got 9223372036854775808"),
        (
            {"n": 2, "seed": INT64_MAX},
            r"seed \+ n - 1 must be at most 2\*\*63 - 1 \(sample i of n uses seed \+ i\), "
            r"got seed=9223372036854775807 with n=2",
        ),
    ],
)
def test_poisoning_values_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_poisoned_params_mutated_after_construction_are_refused_before_the_batch_runs(m3):
    params = SamplingParams(temperature=1.0, seed=1)
    params.seed = 2**64  # dataclasses do not re-check on assignment; the engine re-validates a copy
    assert_untouched(
        m3,
        lambda: m3.generate([GOOD, GOOD], [GREEDY, params], use_tqdm=False),
        ValueError,
        r"seed must be an integer in \[-2\*\*63, 2\*\*63 - 1\] or None",
    )


@pytest.mark.parametrize("prompt_len, max_tokens, needed", [(44, 1, 12), (30, 20, 13)])
def test_request_that_cannot_fit_the_whole_pool_is_refused_at_add_time(m3, prompt_len, max_tokens, needed):
    prompt = {"prompt_token_ids": [5] * prompt_len}
    msg = (
        rf"prompt \({prompt_len} tokens\) \+ max_tokens \({max_tokens}\) needs {needed} KV blocks of 4 tokens, "
        rf"but the whole KV cache has {POOL_BLOCKS}"
    )
    assert_untouched(
        m3, lambda: m3.llm_engine.add_request("big", prompt, SamplingParams(max_tokens=max_tokens)), ValueError, msg
    )
    assert_untouched(m3, lambda: m3.generate(prompt, SamplingParams(max_tokens=max_tokens), use_tqdm=False), ValueError, msg)


def test_a_request_that_fills_the_whole_pool_runs_alone(m3):
    out = m3.generate({"prompt_token_ids": [5] * 30}, SamplingParams(max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 10 and kv_all_free(m3)


@pytest.mark.parametrize("priority", ["high", 1.5, True, None, [1]])
def test_non_integer_priority_is_refused_before_registration(m3, priority):
    assert_untouched(
        m3,
        lambda: m3.llm_engine.add_request("p", GOOD, GREEDY, priority=priority),
        InvalidTypeError,
        "priority must be an integer",
    )
    assert_untouched(
        m3,
        lambda: m3.generate([GOOD], GREEDY, priority=[priority], use_tqdm=False),
        InvalidTypeError,
        r"priority\[0\] must be an integer",
    )


def test_huge_n_is_refused_at_once():
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"n must be an integer in \[1, {MAX_N}\], got 1000000000"):
        SamplingParams(n=10**9)
    assert time.perf_counter() - start < 0.1


@pytest.mark.parametrize("first, second", [("a#0", ("a", 2)), ("a", ("a#1", 1)), ("a#1", ("a", 3))])
def test_user_id_equal_to_a_live_child_id_is_refused(m3, first, second):
    """Either order: the later request would share a sequence name with the earlier one."""
    engine = m3.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    first_n = 2 if first == "a" else 1
    engine.add_request(first, GOOD, replace(params, n=first_n))
    rid, n = second
    with pytest.raises(ValueError, match=rf"request_id '{re.escape(rid)}' clashes with sequence"):
        engine.add_request(rid, GOOD, replace(params, n=n))
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    alone = ids_of(m3.generate(GOOD, replace(params, n=first_n), use_tqdm=False))
    assert [o.request_id for o in outs] == [first] and ids_of(outs) == alone and kv_all_free(m3)


def test_child_ids_are_not_addressable_and_free_ids_can_be_reused(m3):
    engine = m3.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, n=2)
    engine.add_request("a", GOOD, params)
    engine.abort_request("a#0")  # a sample's internal name: not a request id, nothing happens
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert len(outs) == 1 and [len(c.token_ids) for c in outs[0].outputs] == [3, 3]
    engine.add_request("a#0", GOOD, replace(params, n=1))  # "a" is finished: the name is free again
    engine.abort_request(["a#0"])
    assert kv_all_free(m3)


@pytest.mark.parametrize("bad_index", [0, 1, 2])
def test_generate_queues_nothing_when_any_prompt_of_the_batch_is_bad(m3, bad_index):
    prompts = [GOOD, GOOD, GOOD]
    prompts[bad_index] = {"prompt_token_ids": [5, 512]}
    assert_untouched(
        m3,
        lambda: m3.generate(prompts, GREEDY, use_tqdm=False),
        ValueError,
        rf"prompt_token_ids\[1\] is 512, outside the vocabulary \[0, {VOCAB}\)",
    )


def test_generate_does_not_consume_requests_added_through_the_engine(m3):
    engine = m3.llm_engine
    engine.add_request("mine", GOOD, GREEDY)
    steps = engine.stats.num_steps
    with pytest.raises(
        RuntimeError,
        match=r"the engine holds 1 unfinished request\(s\) added through "
        r"LLMEngine.add_request \('mine'\)",
    ):
        m3.generate(GOOD, GREEDY, use_tqdm=False)
    assert engine.stats.num_steps == steps and set(engine.parents) == {"mine"}
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["mine"] and len(m3.generate(GOOD, GREEDY, use_tqdm=False)) == 1


def test_generate_aborts_its_own_requests_when_the_run_fails(m3):
    engine = m3.llm_engine

    def boom():
        raise KeyboardInterrupt

    engine.step = boom
    try:
        with pytest.raises(KeyboardInterrupt):
            m3.generate([GOOD, GOOD], GREEDY, use_tqdm=False)
    finally:
        del engine.step
    assert kv_all_free(m3) and len(m3.generate(GOOD, GREEDY, use_tqdm=False)) == 1


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"temperature": math.nan}, ValueError, r"temperature must be a finite number in \[0, 3.40282e\+38\], got nan"),
        ({"temperature": math.inf}, ValueError, r"temperature must be a finite number in \[0, 3.40282e\+38\], got inf"),
        ({"top_p": math.nan}, ValueError, r"top_p must be a finite number in \(0, 1\], got nan"),
        ({"max_tokens": True}, InvalidTypeError, r"max_tokens must be an integer in \[1, 2\*\*63 - 1\] or None, got True"),
        ({"n": True}, InvalidTypeError, r"n must be an integer in \[1, 128\], got True"),
        ({"ignore_eos": "no"}, InvalidTypeError, "ignore_eos must be a bool, got 'no'"),
        ({"stop": 5}, InvalidTypeError, "stop must be a non-empty string or a list of them, got 5"),
        (
            {"stop": ["w5", 10**5000]},
            InvalidTypeError,  # repr() of that list raises: the message must not
            r"stop must be a non-empty string or a list of them, got <unprintable list>",
        ),
        ({"stop_token_ids": [2.0]}, InvalidTypeError, r"stop_token_ids\[0\] must be an integer in \[0, 2\*\*63 - 1\]"),
        ({"logprobs": -1}, ValueError, r"logprobs must be an integer in \[0, 2\*\*63 - 1\] or None, got -1"),
    ],
)
def test_silent_nonsense_in_sampling_params_is_refused(kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, InvalidTypeError) == (error is InvalidTypeError)


def test_stop_strings_need_a_tokenizer(m3_no_tokenizer):
    assert_untouched(
        m3_no_tokenizer,
        lambda: m3_no_tokenizer.generate(GOOD, SamplingParams(stop="w5"), use_tqdm=False),
        ValueError,
        "stop strings need a tokenizer and model 'random:tiny-llama' has none",
    )


@pytest.mark.parametrize(
    "prompt, match",
    [
        (
            {"prompt_token_ids": [5], "multi_modal_data": "x"},
            "prompt has unsupported key\\(s\\) 'multi_modal_data'; supported: 'cache_salt', 'prompt', 'prompt_token_ids'",
        ),
        ({"prompt_token_ids": [5], "cache_salt": 7}, "cache_salt must be a non-empty string, got int"),
        ({"prompt_token_ids": [5], "prompt": "w6"}, "prompt text does not tokenize to prompt_token_ids"),
        ({}, "prompt must have 'prompt' or 'prompt_token_ids', got an empty dict"),
    ],
)
def test_prompt_dicts_are_checked(m3, prompt, match):
    assert_untouched(m3, lambda: m3.generate(prompt, GREEDY, use_tqdm=False), ValueError, match)


def test_prompt_dict_forms_that_agree_give_the_same_output(m3):
    ids = m3.get_tokenizer()("w5 w6 w7").input_ids
    forms = [
        "w5 w6 w7",
        {"prompt": "w5 w6 w7"},
        {"prompt_token_ids": ids},
        {"prompt": "w5 w6 w7", "prompt_token_ids": tuple(ids)},
    ]
    outs = m3.generate(forms, GREEDY, use_tqdm=False)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
    assert [o.prompt for o in outs] == ["w5 w6 w7", "w5 w6 w7", None, "w5 w6 w7"]


def test_prompt_text_next_to_ids_needs_a_tokenizer(m3_no_tokenizer):
    llm = m3_no_tokenizer
    assert_untouched(
        llm,
        lambda: llm.generate({"prompt_token_ids": [5], "prompt": "w5"}, use_tqdm=False),
        ValueError,
        "prompt text next to prompt_token_ids cannot be checked",
    )


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda llm: llm.generate(GOOD, SamplingParams(stop=5)), InvalidTypeError, "stop must be a non-empty string"),
        (
            lambda llm: llm.generate(None),
            InvalidTypeError,
            "prompts must be a prompt \\(str or dict\\) or a list of them, got NoneType",
        ),
        (
            lambda llm: llm.llm_engine.abort_request(5),
            InvalidTypeError,
            "request_ids must be a request id \\(str\\) or a list of them, got 5",
        ),
        (
            lambda llm: llm.generate({"prompt_token_ids": [5, 6.0]}),
            InvalidTypeError,
            "prompt_token_ids\\[1\\] must be an integer token id, got 6.0",
        ),
        (
            lambda llm: llm.generate(GOOD, {"temperature": 0}),
            InvalidTypeError,
            "sampling_params must be a SamplingParams, None or a list of them, got dict",
        ),
        (
            lambda llm: llm.llm_engine.add_request("x", GOOD, {"temperature": 0}),
            InvalidTypeError,
            "sampling_params must be a SamplingParams or None, got dict",
        ),
        (lambda llm: llm.llm_engine.add_request(5, GOOD), InvalidTypeError, "request_id must be a non-empty string, got 5"),
        (
            lambda llm: llm.generate(GOOD, SamplingParams(logprobs=21)),
            ValueError,
            rf"logprobs must be at most max_logprobs \({MAX_LOGPROBS}\), got 21",
        ),
        (
            lambda llm: llm.generate(GOOD, SamplingParams(stop_token_ids=[VOCAB])),
            ValueError,
            rf"stop_token_ids contains {VOCAB}, outside the vocabulary \[0, {VOCAB}\)",
        ),
    ],
)
def test_unclear_errors_now_name_the_field(m3, call, error, match):
    assert_untouched(m3, lambda: call(m3), error, match)


def test_max_logprobs_is_an_engine_option(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint("llama")), milestone="M2", max_model_len=MAX_LEN, kv_cache_memory=2**20, max_logprobs=-1)
    out = llm.generate(GOOD, SamplingParams(temperature=0.0, max_tokens=2, logprobs=VOCAB), use_tqdm=False)
    assert [len(lp) for lp in out[0].outputs[0].logprobs] == [VOCAB, VOCAB]
    with pytest.raises(ValueError, match=r"max_logprobs must be an integer >= -1"):
        LLM("random:tiny-llama", max_logprobs=-2)


# ---- the scheduler always makes progress -------------------------------------------------------
def stalled_scheduler_setup(num_blocks: int = 4) -> tuple[Scheduler, Request]:
    kv = KVCacheManager(num_blocks, BLOCK)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=MAX_LEN), kv, MAX_LEN)
    # 14 prompt tokens + 8 outputs need 6 blocks of 4; the pool has 4 (the engine would refuse it at add time)
    return sched, make_request("big", list(range(14)), 8)


def test_scheduler_raises_instead_of_spinning_on_a_request_that_cannot_fit():
    sched, big = stalled_scheduler_setup()
    sched.add_request(big)
    runner = FakeRunner(BLOCK)
    with pytest.raises(
        RuntimeError,
        match=r"scheduler stalled: 1 waiting and 0 running request\(s\), none "
        r"schedulable \(KV blocks used 0/4, token budget 64, head of the "
        r"queue 'big'\)",
    ):
        for _ in range(20):
            out = sched.schedule()
            sched.update_from_output(out, runner.execute(out))


def test_scheduler_refuses_non_integer_priority_and_duplicate_ids():
    sched, _ = stalled_scheduler_setup()
    with pytest.raises(InvalidTypeError, match="priority must be an integer, got 'x'"):
        sched.add_request(make_request("r", [1, 2], 2, priority="x"))
    sched.add_request(make_request("r", [1, 2], 2))
    with pytest.raises(ValueError, match="request 'r' is already in the scheduler"):
        sched.add_request(make_request("r", [1, 2], 2))
    assert list(sched.requests) == ["r"] and len(sched.waiting) == 1


lone_workloads = st.lists(st.tuples(st.integers(1, 30), st.integers(1, 12), st.integers(-2, 2)), min_size=1, max_size=6)


@settings(max_examples=80, **PROFILE)
@given(
    workload=lone_workloads,
    num_blocks=st.integers(3, 12),
    batching=st.sampled_from(["static", "continuous"]),
    policy=st.sampled_from(["fcfs", "priority"]),
)
def test_every_request_that_fits_the_pool_alone_finishes_within_a_step_bound(workload, num_blocks, batching, policy):
    """Requests each of which fits the whole pool alone (but not together): all finish, exactly, with at most
    two steps per output token (a step that only preempts is followed by one that runs), never a stall."""
    kv = KVCacheManager(num_blocks, BLOCK)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=MAX_LEN, batching=batching, policy=policy), kv, MAX_LEN)
    expected = {}
    for i, (plen, mt, prio) in enumerate(workload):
        plen = min(plen, num_blocks * BLOCK - mt) if plen + mt > num_blocks * BLOCK else plen
        if plen < 1:
            continue
        prompt = [(i * 11 + j) % 97 for j in range(plen)]
        sched.add_request(make_request(f"r{i}", prompt, mt, priority=prio))
        expected[f"r{i}"] = expected_output(prompt, mt)
    bound = 2 * sum(len(v) for v in expected.values()) + 2
    finished, steps = run(sched, FakeRunner(BLOCK), max_steps=bound + 1)
    assert finished == expected and steps <= bound
    assert kv.block_pool.num_free_blocks == num_blocks


# ---- properties: SamplingParams ----------------------------------------------------------------
def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Per field: (type ok, value ok given the type is ok), written from the documented rules, not from the code.
SPEC = {
    "n": (_int, lambda v: 1 <= v <= MAX_N),
    "temperature": (_num, lambda v: 0 <= v <= FLOAT32_MAX),
    "top_p": (_num, lambda v: 0 < v <= 1),
    "top_k": (_int, lambda v: -1 <= v <= INT64_MAX),
    "min_p": (_num, lambda v: 0 <= v <= 1),
    "seed": (lambda v: v is None or _int(v), lambda v: v is None or INT64_MIN <= v <= INT64_MAX),
    "max_tokens": (lambda v: v is None or _int(v), lambda v: v is None or 1 <= v <= INT64_MAX),
    "stop": (
        lambda v: v is None or isinstance(v, str) or isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v),
        lambda v: v is None or (all(v) if isinstance(v, (list, tuple)) else bool(v)),
    ),
    "stop_token_ids": (lambda v: v is None or isinstance(v, (list, tuple)), lambda v: True),  # + per element
    "ignore_eos": (lambda v: isinstance(v, bool), lambda v: True),
    "logprobs": (lambda v: v is None or _int(v), lambda v: v is None or 0 <= v <= INT64_MAX),
    "output_kind": (lambda v: isinstance(v, RequestOutputKind), lambda v: True),
}
FIELD_NAMES = [f.name for f in fields(SamplingParams) if f.init]


def test_every_sampling_params_field_has_a_documented_rule():
    """A new field needs its rule in SPEC and wild values in WILD, or the properties below would skip it."""
    assert set(SPEC) == set(FIELD_NAMES) == set(WILD)


def first_problem(values: dict) -> tuple[str, bool] | None:
    """(field a refusal must name first, whether it is a type problem), or None when all is valid."""
    for name in FIELD_NAMES:
        type_ok, value_ok = SPEC[name]
        v = values[name]
        if name == "stop_token_ids" and isinstance(v, (list, tuple)):  # checked element by element
            bad = next(((not _int(t), name) for t in v if not (_int(t) and 0 <= t <= INT64_MAX)), None)
            if bad:
                return name, bad[0]
            continue
        if not type_ok(v):
            return name, True
        if not value_ok(v):
            return name, False
        if name == "seed" and v is not None and _int(values["n"]) and v + values["n"] - 1 > INT64_MAX:
            return "seed + n - 1", False
    return None


wild_ints = st.one_of(
    st.integers(-3, 200), st.sampled_from([INT64_MAX, INT64_MAX + 1, INT64_MIN, INT64_MIN - 1, 2**64, -(2**64), 10**5000])
)
wild_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-0.5, 1.5))
junk = st.sampled_from([True, False, None, "1", "", b"x", [1], (), {}, {"a": 1}, 1j])
WILD = {
    "n": st.one_of(st.integers(1, 4), wild_ints, junk),
    "temperature": st.one_of(wild_floats, wild_ints, junk),
    "top_p": st.one_of(wild_floats, wild_ints, junk),
    "top_k": st.one_of(wild_ints, wild_floats, junk),
    "min_p": st.one_of(wild_floats, wild_ints, junk),
    "seed": st.one_of(st.none(), wild_ints, wild_floats, junk),
    "max_tokens": st.one_of(st.none(), st.integers(1, 8), wild_ints, junk),
    "stop": st.one_of(
        st.none(),
        st.text(max_size=3),
        st.lists(st.one_of(st.text(max_size=2), wild_ints), max_size=3),
        st.tuples(st.text(min_size=1, max_size=2)),
        junk,
        wild_ints,
    ),
    "stop_token_ids": st.one_of(
        st.none(),
        st.lists(st.one_of(wild_ints, wild_floats, junk), max_size=3),
        st.tuples(st.integers(0, 9)),
        junk,
        wild_ints,
    ),
    "ignore_eos": st.one_of(st.booleans(), junk, wild_ints),
    "logprobs": st.one_of(st.none(), st.integers(0, 5), wild_ints, junk),
    "output_kind": st.one_of(st.sampled_from(RequestOutputKind), junk, wild_ints),
}


@settings(max_examples=600, **PROFILE)
@given(data=st.data())
def test_sampling_params_accept_exactly_the_documented_values(data):
    """A random subset of fields gets wild values; the rest keep their defaults."""
    chosen = data.draw(st.sets(st.sampled_from(FIELD_NAMES), max_size=4))
    kwargs = {name: data.draw(WILD[name], label=name) for name in sorted(chosen)}
    values = {f.name: f.default for f in fields(SamplingParams) if f.init} | kwargs
    problem = first_problem(values)
    if problem is None:
        p = SamplingParams(**kwargs)
        assert all(SPEC[name][0](getattr(p, name)) and SPEC[name][1](getattr(p, name)) for name in FIELD_NAMES)
        assert type(p.temperature) is float and type(p.top_p) is float and type(p.min_p) is float
        assert p.top_k >= 0 and all(type(s) is str and s for s in p.stop_strings)
        assert p.seed is None or INT64_MIN <= p.seed + p.n - 1 <= INT64_MAX
        assert replace(p) == p  # the engine's re-validating copy leaves a valid instance unchanged
        return
    name, is_type = problem
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert re.match(rf"{re.escape(name)}[ \[]", str(info.value)), (kwargs, str(info.value))
    assert isinstance(info.value, InvalidTypeError) == is_type, (kwargs, str(info.value))
    assert len(str(info.value)) < 400  # a 10**5000 is not printed in full


# ---- properties: engine call sequences -----------------------------------------------------------
RIDS = ["a", "b", "a#0", "a#1", "b#0", "0", "1", "0#1"]
BAD_RIDS = [5, "", None, b"a"]


@dataclass
class Case:
    """One request as the user passes it, and the fields a refusal may name (empty: it must be accepted)."""

    prompt: object
    params: object
    defects: set[str] = field(default_factory=set)
    ids: list[int] | None = None
    max_tokens: int = 0


def _ids_ok(ids) -> bool:
    return isinstance(ids, (list, tuple)) and bool(ids) and all(_int(t) and 0 <= t < VOCAB for t in ids)


def prompt_ids(prompt, tok) -> tuple[list[int] | None, str | None]:
    """The prompt's token ids, or the field a refusal must name (the documented prompt rules)."""
    if isinstance(prompt, str):
        if not prompt or tok is None:
            return None, "prompt"
        return list(tok(prompt).input_ids), None
    if not isinstance(prompt, dict) or not prompt or set(prompt) - {"prompt", "prompt_token_ids"}:
        return None, "prompt"
    text = prompt.get("prompt")
    if "prompt" in prompt and not isinstance(text, str):
        return None, "prompt"
    if "prompt_token_ids" not in prompt:
        return prompt_ids(text, tok)
    if not _ids_ok(prompt["prompt_token_ids"]):
        return None, "prompt_token_ids"
    ids = list(prompt["prompt_token_ids"])
    if text is not None and (tok is None or tok(text).input_ids != ids):
        return None, "prompt"
    return ids, None


def classify(prompt, params, tok, paged: bool) -> Case:
    case = Case(prompt, params)
    ids, defect = prompt_ids(prompt, tok)
    if defect:
        case.defects.add(defect)
    elif len(ids) >= MAX_LEN:
        case.defects.add("prompt")
    if params is not None and not isinstance(params, SamplingParams):
        case.defects.add("sampling_params")
        return case
    p = params or SamplingParams()
    problem = first_problem({name: getattr(p, name) for name in FIELD_NAMES})
    if problem:
        case.defects.add(problem[0].split()[0])
        return case
    stops = [p.stop] if isinstance(p.stop, str) else p.stop
    if stops and tok is None:
        case.defects.add("stop")
    if any(t >= VOCAB for t in p.stop_token_ids or []):
        case.defects.add("stop_token_ids")
    if p.logprobs is not None and p.logprobs > MAX_LOGPROBS:
        case.defects.add("logprobs")
    if case.defects:
        return case
    case.ids, case.max_tokens = ids, p.max_tokens or MAX_LEN - len(ids)
    total = len(ids) + case.max_tokens
    if total > MAX_LEN or (paged and cdiv(total, BLOCK) > POOL_BLOCKS):
        case.defects.add("max_tokens")
    return case


def good_prompts(has_tok: bool):
    ids = st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=12)
    forms = [ids.map(lambda x: {"prompt_token_ids": x}), ids.map(lambda x: {"prompt_token_ids": tuple(x)})]
    if has_tok:
        words = st.lists(st.integers(3, 40), min_size=1, max_size=8).map(lambda x: " ".join(f"w{i}" for i in x))
        forms += [words, words.map(lambda t: {"prompt": t})]
    return st.one_of(*forms)


bad_prompts = st.sampled_from(
    [
        "",
        "w5 w6",
        3.5,
        None,
        {},
        {"prompt_token_ids": []},
        {"prompt_token_ids": [1, VOCAB]},
        {"prompt_token_ids": [3, 4.0]},
        {"prompt_token_ids": [True]},
        {"prompt_token_ids": "w5"},
        {"prompt_token_ids": [5], "multi_modal_data": {}},
        {"prompt_token_ids": [9], "prompt": "w5"},
        {"prompt": 5},
        {"prompt_token_ids": [3] * MAX_LEN},
        ["w5"],
    ]
)


@st.composite
def good_params(draw, has_tok: bool) -> SamplingParams:
    """Greedy or seeded, so a one-at-a-time run gives the exact expected output."""
    kw = dict(
        n=draw(st.integers(1, 3)),
        max_tokens=draw(st.sampled_from([1, 2, 3, 5, 8, 36, None])),
        ignore_eos=draw(st.booleans()),
        logprobs=draw(st.sampled_from([None, 0, 2])),
        stop_token_ids=draw(st.sampled_from([None, [7], (9, 11)])),
    )
    if draw(st.booleans()):
        kw["temperature"] = 0.0
    else:
        kw.update(
            temperature=draw(st.sampled_from([0.7, 1.0])),
            seed=draw(st.integers(-3, 3)),
            top_k=draw(st.sampled_from([0, -1, 5])),
            top_p=draw(st.sampled_from([1.0, 0.9])),
            min_p=draw(st.sampled_from([0.0, 0.1])),
        )
    if has_tok:
        kw["stop"] = draw(st.sampled_from([None, "w9", ["w5", "w77"]]))
    return SamplingParams(**kw)


@st.composite
def bad_params(draw, has_tok: bool):
    """A dict, or valid params mutated after construction into something the engine must refuse."""
    if draw(st.integers(0, 9)) == 0:
        return {"temperature": 0.0}
    p = draw(good_params(has_tok))
    name, value = draw(
        st.sampled_from(
            [
                ("temperature", math.nan),
                ("n", 0),
                ("n", 10**9),
                ("seed", 2**64),
                ("top_k", 2**63),
                ("max_tokens", True),
                ("ignore_eos", "yes"),
                ("stop", 5),
                ("logprobs", MAX_LOGPROBS + 1),
                ("stop_token_ids", [VOCAB]),
                ("stop", "w5"),
                ("top_p", 0.0),
                ("max_tokens", MAX_LEN),
            ]
        )
    )
    setattr(p, name, value)
    return p


def weighted(*choices):
    """Draw from ``(weight, strategy)`` choices in proportion to their weights (``one_of`` is uniform)."""
    picks = [i for i, (w, _) in enumerate(choices) for _ in range(w)]
    return st.sampled_from(picks).flatmap(lambda i: choices[i][1])


def mostly(good, bad):
    """Four valid values for each bad one: enough accepted calls to reach deep engine states."""
    return weighted((4, good), (1, bad))


def requests(has_tok: bool):
    params = st.one_of(st.none(), mostly(good_params(has_tok), bad_params(has_tok)))
    return st.tuples(mostly(good_prompts(has_tok), bad_prompts), params)


def ops(has_tok: bool):
    add = st.tuples(
        st.just("add"),
        mostly(st.sampled_from(RIDS), st.sampled_from(BAD_RIDS)),
        requests(has_tok),
        mostly(st.integers(-2, 2), st.sampled_from(["high", 1.5, True, None])),
    )
    step = st.tuples(st.just("step"), st.integers(1, 4))
    abort = st.tuples(
        st.just("abort"),
        mostly(
            st.one_of(st.sampled_from(RIDS), st.lists(st.sampled_from(RIDS), max_size=3)),
            st.sampled_from([5, [5], None, {"a": 1}]),
        ),
    )
    generate = st.tuples(
        st.just("generate"),
        st.lists(requests(has_tok), min_size=1, max_size=3),
        st.booleans(),
        mostly(st.none(), st.sampled_from(["bad-priority", "bad-prompts"])),
    )
    return st.lists(weighted((4, add), (2, step), (1, abort), (2, generate)), min_size=1, max_size=10)


class Harness:
    """Runs call sequences on one LLM and checks every outcome against a one-at-a-time reference run."""

    def __init__(self, llm: LLM, ref: LLM) -> None:
        self.llm, self.ref, self.engine = llm, ref, llm.llm_engine
        self.tok = llm.get_tokenizer()
        self.paged = isinstance(self.engine.kv_cache_manager, KVCacheManager)
        self.live: dict[str, Case] = {}  # user requests added through the engine, not yet finished or aborted
        self.memo: dict[tuple, list] = {}

    def reference(self, case: Case) -> list[tuple]:
        params = replace(case.params) if case.params is not None else SamplingParams()
        key = (tuple(case.ids), repr(params))
        if key not in self.memo:
            out = self.ref.generate({"prompt_token_ids": case.ids}, params, use_tqdm=False)[0]
            self.memo[key] = self.summary(out)
        return self.memo[key]

    @staticmethod
    def summary(out) -> list[tuple]:
        return [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in out.outputs]

    def assert_correct(self, out, case: Case) -> None:
        """Equal to the one-at-a-time run; unseeded random sampling (the default params) can only be checked
        for shape: ``n`` completions of at most ``max_tokens`` in-vocabulary tokens, each finished."""
        params = case.params or SamplingParams()
        if params.greedy or params.seed is not None:
            assert self.summary(out) == self.reference(case), out.request_id
            return
        assert len(out.outputs) == params.n and all(
            0 < len(c.token_ids) <= case.max_tokens
            and all(0 <= t < VOCAB for t in c.token_ids)
            and c.finish_reason in ("stop", "length")
            for c in out.outputs
        ), out

    def classify(self, prompt, params) -> Case:
        return classify(prompt, params, self.tok, self.paged)

    @contextmanager
    def step_budget(self, limit: int):
        """Fail the moment a call steps the engine more than ``limit`` times (a hang becomes an error)."""
        engine, taken = self.engine, 0

        def step():
            nonlocal taken
            taken += 1
            assert taken <= limit, f"more than {limit} steps"
            return type(engine).step(engine)

        engine.step = step
        try:
            yield
        finally:
            del engine.step

    def expect_refusal(self, call, names: set[str], error: type[Exception] = ValueError) -> None:
        """``call`` raises ``error`` naming one of ``names``, and changes and computes nothing."""
        before = (
            self.engine.stats.num_steps,
            set(self.engine.parents),
            set(self.engine.scheduler.requests),
            dict(self.engine.kv_cache_manager.num_tokens),
        )
        with pytest.raises(error) as info, self.step_budget(0):
            call()
        msg = str(info.value)
        assert error is RuntimeError or any(re.search(rf"(?<![\w\[]){re.escape(n)}(?![\w])", msg) for n in names), (
            names,
            msg,
        )
        after = (
            self.engine.stats.num_steps,
            set(self.engine.parents),
            set(self.engine.scheduler.requests),
            dict(self.engine.kv_cache_manager.num_tokens),
        )
        assert before == after, msg

    def check_finished(self, outs) -> None:
        for out in outs:
            if out.finished:
                self.assert_correct(out, self.live.pop(out.request_id))

    @staticmethod
    def step_bound(cases) -> int:
        """Every step that runs yields a token, and a step that only preempts is followed by one that runs."""
        return 2 * sum((c.params.n if c.params else 1) * c.max_tokens for c in cases) + 2

    def add(self, rid, request, priority) -> None:
        case = self.classify(*request)
        names = set(case.defects)
        if not isinstance(rid, str) or not rid:
            names.add("request_id")
        if not (_int(priority) and INT64_MIN <= priority <= INT64_MAX):
            names.add("priority")
        n = case.params.n if isinstance(case.params, SamplingParams) and not case.defects else 1
        mine = {rid} if n == 1 else {f"{rid}#{i}" for i in range(n)}
        theirs = set().union(
            *[
                {r} if (c.params.n if c.params else 1) == 1 else {f"{r}#{i}" for i in range(c.params.n)}
                for r, c in self.live.items()
            ]
        )
        may_clash = isinstance(rid, str) and (rid in self.live or bool(mine & theirs))
        if names or may_clash:
            try:
                self.expect_refusal(
                    lambda: self.engine.add_request(rid, case.prompt, case.params, priority),
                    names | ({"request_id"} if may_clash else set()),
                )
            except pytest.fail.Exception:
                assert not names and rid not in self.live, "a bad request was accepted"
                self.live[rid] = case  # a possible clash that was not (the other sequence had finished)
            return
        with self.step_budget(0):
            self.engine.add_request(rid, case.prompt, case.params, priority)
        self.live[rid] = case

    def step(self, count: int) -> None:
        for _ in range(count):
            self.check_finished(self.engine.step())

    def abort(self, ids) -> None:
        if isinstance(ids, str) or isinstance(ids, list) and all(isinstance(r, str) for r in ids):
            self.engine.abort_request(ids)
            for rid in [ids] if isinstance(ids, str) else ids:
                self.live.pop(rid, None)
        else:
            self.expect_refusal(lambda: self.engine.abort_request(ids), {"request_ids"})

    def generate(self, reqs, one_params: bool, flaw: str | None) -> None:
        prompts = [p for p, _ in reqs]
        params = reqs[0][1] if one_params else [sp for _, sp in reqs]
        cases = [self.classify(p, reqs[0][1] if one_params else sp) for p, sp in reqs]
        names = set().union(*[c.defects for c in cases])
        priority = None
        if flaw == "bad-priority":
            priority, names = [0] * (len(reqs) - 1) + [1.5], names | {"priority"}
        elif flaw == "bad-prompts":
            prompts, names = set(map(repr, prompts)), names | {"prompts"}
        call = lambda: self.llm.generate(prompts, params, use_tqdm=False, priority=priority)  # noqa: E731
        if self.live:
            return self.expect_refusal(call, set(), RuntimeError)
        if names:
            return self.expect_refusal(call, names)
        with self.step_budget(self.step_bound(cases)):
            outs = call()
        assert len(outs) == len(cases)
        for out, case in zip(outs, cases):
            self.assert_correct(out, case)

    def finish(self) -> None:
        """Drain what the sequence left (bounded), then a good request must come out right on a clean pool."""
        bound, steps = self.step_bound(self.live.values()), 0
        while self.engine.has_unfinished_requests():
            self.step(1)
            steps += 1
            assert steps <= bound, "the engine did not drain within its step bound"
        assert not self.live and kv_all_free(self.llm)
        self.assert_correct(self.llm.generate(GOOD, GREEDY, use_tqdm=False)[0], self.classify(GOOD, GREEDY))
        assert kv_all_free(self.llm)


ENGINES = {"M1": "llama", "M2": "random:tiny-llama", "M3": "llama", "M4": "random:tiny-qwen3"}


@pytest.fixture(scope="module")
def harnesses(tiny_checkpoint):
    made = {}

    def get(milestone: str) -> Harness:
        if milestone not in made:
            model = ENGINES[milestone]
            model = str(tiny_checkpoint(model)) if model == "llama" else model
            made[milestone] = Harness(make_llm(model, milestone), make_llm(model, milestone))
        return made[milestone]

    return get


@pytest.mark.parametrize("milestone", ["M1", "M2", "M3", "M4"])
def test_engine_call_sequences_never_poison_hang_or_corrupt(harnesses, milestone):
    h = harnesses(milestone)
    has_tok = h.tok is not None

    @settings(max_examples=60, **PROFILE)
    @given(sequence=ops(has_tok))
    def check(sequence):
        for op, *args in sequence:
            getattr(h, op)(*args)
        h.finish()

    check()
