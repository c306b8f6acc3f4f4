"""The step cost model's open-loop calibration (M5, dynamic chunk sizing): designed steps timed before
serving identify every term, which the controller's own steps cannot."""

from __future__ import annotations

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


def test_calibration_identifies_every_term_and_serving_moves_only_the_tail_factor():
    """Designed steps pin every term; serving's steps (here ones that run 10% slower than the designed ones)
    then move only the tail factor, not the terms (the H200's closed-loop fits priced a 512-token chunk
    anywhere from 2.9 to 86 ms)."""
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
    assert model.tail_factor == pytest.approx(1.1)


def test_only_steps_priced_near_the_target_teach_the_tail():
    """Served steps come at least a host's loop apart (here 18 ms, on top of the made-up device): small prompt
    steps then run up to twice their price, steps priced near a 40 ms target 5% over it. With ``tail_from`` at
    half the target the tail is the large steps' 5%; learned from every prompt step it is about 2."""
    steps = flat(StepCostModel.calibration_families(8192, 256, 9216))
    near, everything = StepCostModel(tail_from=20e-3), StepCostModel()
    for model in (near, everything):
        assert model.calibrate(steps, [device(s) for s in steps])
    rng = np.random.default_rng(2)
    for q in rng.integers(2, 2000, size=200):
        shapes = [(1, 1000)] * 16 + [(int(q), int(q) + 1000)]
        interval = max(18e-3, 1.05 * device(shapes))  # the host's loop or the device, whichever is slower
        for model in (near, everything):
            model.observe(shapes, interval)
    assert near.tail_factor == pytest.approx(1.05)
    assert everything.tail_factor > 1.5
    assert near.coef == pytest.approx(TRUE_COEF, rel=1e-6, abs=1e-12)


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
    tail learned from steps priced at half the target or more), no made-up request holds a block table row or
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
            assert engine.scheduler.cost_model.tail_from == pytest.approx(2.5e-3)  # half the target teaches the tail
            assert engine.model_runner.block_tables.row_of == {}
            assert engine.kv_cache_manager.block_pool.num_free_blocks == engine.kv_cache_manager.num_blocks
        outs[target] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs[5.0] == outs[None]
