"""The step cost model's open-loop calibration (M5, dynamic chunk sizing): designed steps timed before
serving identify every term, which the controller's own steps cannot."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from folovllm import LLM, SamplingParams
from folovllm.core.sched.cost_model import StepCostModel
from folovllm.outputs import ModelRunnerOutput
from folovllm.worker.calibration import time_designed_steps

TRUE_COEF = [2e-3, 5e-3, 1e-5, 1e-7, 1e-8]


def device(shapes) -> float:
    """A made-up GPU: 2 ms a step, 5 ms more with any chunk, 10 us a token, 0.1 us per context token,
    10 ns per (query, key) pair."""
    return float(StepCostModel.features(shapes) @ np.array(TRUE_COEF))


def flat(families):
    return [step for family in families for step in family]


def test_calibration_identifies_every_term_and_serving_moves_none():
    """Designed steps pin every term; serving's steps (here ones that run 10% slower than the designed ones)
    then move none of them (the H200's closed-loop fits priced a 512-token chunk anywhere from 2.9 to 86 ms),
    and without a target nothing steers the tail factor."""
    rng = np.random.default_rng(0)
    served = [
        [(1, int(c)) for c in rng.integers(200, 4000, size=rng.integers(8, 24))] + [(q, q + int(rng.integers(0, 6000)))]
        for q in rng.integers(2, 600, size=100)
    ]
    chunk = [(512, 512)]
    true_price = device(chunk) - device([(1, 512)])
    steps = flat(StepCostModel.calibration_families(8192, 256, 9216))
    model = StepCostModel()
    assert model.calibrate(steps, [device(s) for s in steps])
    assert model.calibrated and model.coef == pytest.approx(TRUE_COEF, rel=1e-6, abs=1e-12)
    for shapes in served:
        model.observe(shapes, 1.1 * device(shapes))  # serving runs 10% slower than the designed steps
    assert model.coef == pytest.approx(TRUE_COEF, rel=1e-6, abs=1e-12)
    assert model.predict(chunk) - model.predict([(1, 512)]) == pytest.approx(true_price, rel=1e-6)
    assert model.tail_factor == 1.0


def closed_loop(model: StepCostModel, num_steps: int, step_time) -> list[float]:
    """Serve ``num_steps`` steps of 16 decodes and one chunk sized to the model's aim; their measured times."""
    decodes = [(1, 1000)] * 16
    times = []
    for i in range(num_steps):
        time_left = model.aim - model.predict(decodes) - model.prefill_cost
        q = min(8192, max(2, model.max_chunk(1000, time_left)))
        shapes = decodes + [(q, q + 1000)]
        times.append(step_time(i, shapes))
        model.observe(shapes, times[-1])
    return times


def test_the_tail_factor_settles_where_one_percent_of_the_steps_miss_the_target():
    """A made-up device whose served steps come at least a host's loop apart (18 ms) and one in ten 25% slower
    than priced, and a 40 ms target: the factor rises to about 1.25 and settles where about 1% of the steps
    run over."""
    steps = flat(StepCostModel.calibration_families(8192, 256, 9216))
    model = StepCostModel(target=40e-3)
    assert model.calibrate(steps, [device(s) for s in steps])
    rng = np.random.default_rng(2)

    def served(i, shapes):
        return max(18e-3, device(shapes) * (1.25 if rng.random() < 0.1 else 1.0))

    times = np.array(closed_loop(model, 3000, served))
    assert 0.003 <= (times[500:] > 40e-3).mean() <= 0.02
    assert 1.25 / 1.1 <= model.tail_factor <= 1.25 * 1.1  # about the slow steps' 1.25
    assert times[500:].mean() > 0.8 * 40e-3 / 1.25  # the chunks still fill most of the room
    assert model.coef == pytest.approx(TRUE_COEF, rel=1e-6, abs=1e-12)


def test_host_stalls_do_not_hold_the_aim_down():
    """Two 200 ms stalls (a host pause) raise the factor twice; the steps sized to the aim that follow and meet
    the target bring it back. A factor learned as the 98th percentile of measured / predicted over steps
    priced near the target kept such stalls for good once the aim fell below where steps are counted (on the
    H200: 3.7, and 39% of a fixed budget's throughput)."""
    steps = flat(StepCostModel.calibration_families(8192, 256, 9216))
    model = StepCostModel(target=40e-3)
    assert model.calibrate(steps, [device(s) for s in steps])

    def served(i, shapes):
        return 0.99 * device(shapes)

    closed_loop(model, 100, served)
    assert model.tail_factor == 1.0
    closed_loop(model, 2, lambda i, s: 0.2)
    assert model.tail_factor == pytest.approx(math.exp(2 * 0.1 * 0.99))
    closed_loop(model, 300, served)
    assert model.tail_factor == pytest.approx(1.0)


def test_decode_steps_over_the_target_do_not_raise_the_tail_factor():
    """No chunk size shortens a decode-only step, so one over the target is not counted; one under it is (the
    client's p99 is over every gap)."""
    steps = flat(StepCostModel.calibration_families(8192, 256, 9216))
    model = StepCostModel(target=40e-3)
    assert model.calibrate(steps, [device(s) for s in steps])
    model.tail_factor = 2.0
    decodes = [(1, 1000)] * 4
    model.observe(decodes, 50e-3)
    assert model.tail_factor == 2.0
    model.observe(decodes, 10e-3)
    assert model.tail_factor == pytest.approx(2.0 * math.exp(-0.1 * 0.01))
    model.observe(decodes + [(64, 1064)], 50e-3)
    assert model.tail_factor == pytest.approx(2.0 * math.exp(-0.1 * 0.01 + 0.1 * 0.99))


def test_calibration_needs_steps_that_span_every_term():
    """A budget of two tokens cannot carry a chunk beside a decode: no calibration, the model fits served
    steps as before."""
    steps = [[(1, 16)], [(1, 16)] * 2, [(2, 2)]]
    model = StepCostModel()
    assert not model.calibrate(steps, [device(s) for s in steps])
    assert not model.calibrated and not model.ready


def test_calibration_keeps_terms_non_negative_and_refits_the_rest():
    """Timing noise can drive a small term below zero; it is dropped and the others refitted, not clipped
    after the fact (which would leave the others fitted to a negative partner)."""
    steps = flat(StepCostModel.calibration_families(2048, 64, 4096))
    coef = np.array([2e-3, 0.0, 1e-5, 1e-7, 1e-8])
    noise = np.random.default_rng(1).normal(1.0, 0.02, len(steps))
    model = StepCostModel()
    assert model.calibrate(steps, [float(StepCostModel.features(s) @ coef) * k for s, k in zip(steps, noise)])
    assert (model.coef >= 0).all()
    x = np.stack([StepCostModel.features(s) for s in steps])
    rel = np.abs(x @ model.coef / (x @ coef) - 1)
    assert rel.max() < 0.06


@settings(max_examples=60, deadline=None)
@given(
    max_tokens=st.integers(16, 16384),
    max_seqs=st.integers(1, 512),
    max_len=st.integers(64, 32768),
)
def test_calibration_steps_fit_the_engines_limits_and_span_every_term(max_tokens, max_seqs, max_len):
    """Every designed step is one the engine could schedule (tokens, sequences, context), and the first two
    steps of every family, which always run, already identify all five terms."""
    families = StepCostModel.calibration_families(max_tokens, max_seqs, max_len)
    for step in flat(families):
        assert 1 <= len(step) <= max_seqs
        assert sum(q for q, _ in step) <= max_tokens
        assert all(1 <= q <= seq_len <= max_len for q, seq_len in step)
    first_two = [step for family in families for step in family[:2]]
    if max_tokens >= 64 and max_seqs >= 2 and max_len >= 256:  # any real engine; smaller ones may fit served steps
        assert StepCostModel().calibrate(first_two, [device(s) for s in first_two])


def test_calibration_stops_a_family_once_its_steps_outgrow_the_limit():
    """Each family runs from its smallest step and stops after the first slower than the limit (the first
    two always run); the made-up requests leave the block table, and the runner's step timing starts over."""
    ran, finished, resets = [], [], []

    def execute_model(sched):
        finished.extend(sched.finished_req_ids)
        if not sched.scheduled:
            return ModelRunnerOutput([], [])
        shapes = [(s.num_tokens, s.start_pos + s.num_tokens) for s in sched.scheduled]
        ran.append(shapes)
        return ModelRunnerOutput([None] * len(shapes), [None] * len(shapes), device_time=device(shapes))

    runner = SimpleNamespace(
        kv_caches=[np.zeros((2, 1000))],
        block_size=16,
        execute_model=execute_model,
        reset_step_timing=lambda: resets.append(1),
    )
    families = [
        [[(q, q)] for q in (16, 64, 256, 1024, 4096)],  # 7.2, 7.7, 10.2, 29, 220 ms
        [[(1, 16)], [(1, 16)] * 64],  # both, whatever the limit
    ]
    steps, seconds = time_designed_steps(runner, families, limit=0.02, repeats=2)
    assert steps == families[0][:4] + families[1]
    assert seconds == pytest.approx([device(s) for s in steps])
    assert len(ran) == 3 * len(steps)  # one run not counted, two timed
    assert sorted(set(finished)) == sorted({f"calibration-{i}-{j}" for i, s in enumerate(steps) for j in range(len(s))})
    assert resets == [1]


def test_engine_calibrates_before_serving_and_leaves_no_trace(tiny_checkpoint):
    """With ``target_itl_ms`` the engine times the designed steps at start-up: the model is calibrated (its
    tail factor steered against the target), no made-up request holds a block table row or
    a KV block, and outputs equal a run without a target."""
    folder = str(tiny_checkpoint("qwen3"))
    prompts = [{"prompt_token_ids": [(7 * i + j) % 400 + 3 for j in range(30 + 17 * i)]} for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {}
    for target in (None, 5.0):
        llm = LLM(folder, milestone="M5", max_model_len=128, kv_cache_memory=2**22, block_size=4,
                  max_num_batched_tokens=32, target_itl_ms=target)  # fmt: skip
        engine = llm.llm_engine
        if target:
            assert engine.scheduler.cost_model.calibrated and engine.scheduler.cost_model.ready
            assert engine.scheduler.cost_model.target == pytest.approx(5e-3)
            assert engine.model_runner.block_tables.row_of == {}
            assert engine.kv_cache_manager.block_pool.num_free_blocks == engine.kv_cache_manager.num_blocks
        outs[target] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs[5.0] == outs[None]
