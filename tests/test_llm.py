"""End-to-end behaviour of ``LLM`` / ``LLMEngine``: HF equality, stops, validation, n>1, preemption."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from folovllm import LLM, SamplingParams
from folovllm.engine.detokenizer import IncrementalDetokenizer

GREEDY_64 = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)


def hf_greedy(folder, prompts: list[list[int]], n: int) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
            outs.append(gen[0, len(p) :].tolist())
    return outs


def token_ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("variant", ["llama", "llama3", "qwen2", "qwen3"])
def test_greedy_matches_hf_generate_for_every_milestone(tiny_checkpoint, variant):
    folder = tiny_checkpoint(variant)
    prompts = [[(7 * i + 3 * j) % 500 + 3 for j in range(n)] for i, n in enumerate([5, 17, 33])]
    expected = hf_greedy(folder, prompts, 64)
    for milestone, extra in [("M0", {}), ("M1", {}), ("M2", {}), ("M3", {"block_size": 4})]:
        llm = LLM(str(folder), milestone=milestone, max_model_len=128, kv_cache_memory=2**22, **extra)
        got = token_ids(llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY_64, use_tqdm=False))
        assert got == expected, milestone


@pytest.mark.slow
def test_smollm2_greedy_matches_hf_generate(smollm2_dir):
    llm = LLM("smollm2-135m", milestone="M3", max_model_len=256)
    tok = llm.get_tokenizer()
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    prompts = [tok(t).input_ids for t in texts]
    got = token_ids(llm.generate(texts, GREEDY_64, use_tqdm=False))
    assert got == hf_greedy(smollm2_dir, prompts, 64)


@pytest.fixture(scope="module")
def tiny_llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint("llama")), milestone="M3", max_model_len=64, kv_cache_memory=2**22, block_size=4)


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ("", None, "prompt must not be empty"),
        ({"prompt_token_ids": []}, None, "prompt_token_ids must be a non-empty list of token ids"),
        ({"prompt_token_ids": [1, 512]}, None, r"prompt_token_ids\[1\] is 512, outside the vocabulary \[0, 512\)"),
        ({"prompt_token_ids": [3] * 64}, None, "prompt has 64 tokens; max_model_len is 64"),
        (
            {"prompt_token_ids": [3] * 60},
            SamplingParams(max_tokens=5),
            r"prompt \(60 tokens\) \+ max_tokens \(5\) exceeds max_model_len \(64\)",
        ),
        (3.5, None, "prompt must be a string or a dict with 'prompt' or 'prompt_token_ids', got float"),
    ],
)
def test_bad_input_raises_before_compute_and_engine_keeps_working(tiny_llm, prompt, params, message):
    engine = tiny_llm.llm_engine
    steps = engine.stats.num_steps
    with pytest.raises(ValueError, match=message):
        tiny_llm.generate([{"prompt_token_ids": [5, 6]}, prompt], params, use_tqdm=False)
    assert engine.stats.num_steps == steps and not engine.has_unfinished_requests()
    out = tiny_llm.generate({"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, r"temperature must be a finite number in \[0, 3.40282e\+38\], got -0.1"),
        ({"top_p": 0.0}, r"top_p must be a finite number in \(0, 1\], got 0.0"),
        ({"top_k": -2}, r"top_k must be an integer in \[-1, 2\*\*63 - 1\], got -2"),
        ({"min_p": 1.5}, r"min_p must be a finite number in \[0, 1\]"),
        ({"max_tokens": 0}, r"max_tokens must be an integer in \[1, 2\*\*63 - 1\] or None, got 0"),
        ({"n": 0}, r"n must be an integer in \[1, 128\], got 0"),
        ({"stop": [""]}, "stop must be a non-empty string"),
    ],
)
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_text_prompt_without_tokenizer_is_refused():
    llm = LLM("random:tiny-llama", max_model_len=64, kv_cache_memory=2**20)
    with pytest.raises(ValueError, match="prompt is text but model 'random:tiny-llama' has no tokenizer"):
        llm.generate("hello", use_tqdm=False)


def test_stop_conditions(tiny_llm):
    engine = tiny_llm.llm_engine
    prompt = {"prompt_token_ids": [9, 8, 7]}
    free_run = tiny_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[
        0
    ].outputs[0]
    assert (free_run.finish_reason, len(free_run.token_ids)) == ("length", 12)
    third = free_run.token_ids[2]
    first_hit = free_run.token_ids.index(third)
    by_id = tiny_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[third]), use_tqdm=False)[
        0
    ].outputs[0]
    assert by_id.token_ids == free_run.token_ids[: first_hit + 1]
    assert (by_id.finish_reason, by_id.stop_reason) == ("stop", third)
    words = free_run.text.split()
    by_text = tiny_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, stop=[words[3]]), use_tqdm=False)[
        0
    ].outputs[0]
    assert by_text.text == free_run.text[: free_run.text.index(words[3])]
    assert (by_text.finish_reason, by_text.stop_reason) == ("stop", words[3])
    engine.eos_token_ids = (third,)
    try:
        by_eos = tiny_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    finally:
        engine.eos_token_ids = (2,)
    assert by_eos.outputs[0].finish_reason == "stop" and by_eos.outputs[0].stop_reason is None
    to_the_end = tiny_llm.generate(
        {"prompt_token_ids": [3] * 60}, SamplingParams(max_tokens=None, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    assert (to_the_end.finish_reason, len(to_the_end.token_ids)) == ("length", 4)


def test_outputs_come_back_in_input_order_with_metrics(tiny_llm):
    prompts = [{"prompt_token_ids": [3 + i] * (10 - i)} for i in range(5)]
    params = [SamplingParams(temperature=0, max_tokens=2 + 3 * i, ignore_eos=True) for i in range(5)]
    outs = tiny_llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 5, 8, 11, 14]
    assert [o.prompt_token_ids for o in outs] == [p["prompt_token_ids"] for p in prompts]
    m = outs[4].metrics
    assert m.ttft > 0 and m.tpot > 0 and m.e2e_latency >= m.ttft and m.num_output_tokens == 14


def test_seeded_sampling_is_independent_of_the_batch(tiny_llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = tiny_llm.generate({"prompt_token_ids": [4, 5, 6]}, params, use_tqdm=False)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": [7] * k} for k in range(1, 6)]
    batch = tiny_llm.generate(
        others + [{"prompt_token_ids": [4, 5, 6]}],
        [SamplingParams(temperature=1.0, max_tokens=10)] * 5 + [params],
        use_tqdm=False,
    )
    assert batch[-1].outputs[0].token_ids == alone


@pytest.mark.parametrize("milestone", ["M2", "M3"])
def test_n_samples_equal_independent_requests_with_consecutive_seeds(tiny_checkpoint, milestone):
    llm = LLM(str(tiny_checkpoint("qwen3")), milestone=milestone, max_model_len=64, kv_cache_memory=2**22, block_size=4)
    prompt = {"prompt_token_ids": [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]}
    base = dict(temperature=0.9, top_k=50, max_tokens=12, ignore_eos=True, logprobs=2)
    together = llm.generate(prompt, SamplingParams(n=4, seed=100, **base), use_tqdm=False)[0]
    alone = [llm.generate(prompt, SamplingParams(seed=100 + i, **base), use_tqdm=False)[0].outputs[0] for i in range(4)]
    assert [c.index for c in together.outputs] == [0, 1, 2, 3]
    assert [c.token_ids for c in together.outputs] == [a.token_ids for a in alone]
    assert len({tuple(c.token_ids) for c in together.outputs}) > 1
    for c in together.outputs:
        assert all(t in lp and len(lp) in (2, 3) for t, lp in zip(c.token_ids, c.logprobs))
        assert c.cumulative_logprob == pytest.approx(sum(lp[t] for t, lp in zip(c.token_ids, c.logprobs)))


@pytest.mark.parametrize("milestone, budget", [("M2", 3 * 64 * 2 * 2 * 2 * 16 * 4), ("M3", 40 * 4 * 2 * 2 * 2 * 16 * 4)])
def test_preemption_under_memory_pressure_keeps_greedy_outputs(tiny_checkpoint, milestone, budget):
    folder = str(tiny_checkpoint("llama"))
    prompts = [{"prompt_token_ids": [(5 * i + j) % 500 + 3 for j in range(8 + 3 * i)]} for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    roomy = LLM(folder, milestone=milestone, max_model_len=64, kv_cache_memory=2**24, block_size=4)
    tight = LLM(folder, milestone=milestone, max_model_len=64, kv_cache_memory=budget, block_size=4)
    expected = token_ids(roomy.generate(prompts, params, use_tqdm=False))
    assert token_ids(tight.generate(prompts, params, use_tqdm=False)) == expected
    if milestone == "M3":
        assert tight.llm_engine.scheduler.num_preemptions > 0
    assert roomy.llm_engine.scheduler.num_preemptions == 0


def test_abort_request_mid_generation(tiny_llm):
    engine = tiny_llm.llm_engine
    engine.add_request("a", {"prompt_token_ids": [3, 4]}, SamplingParams(max_tokens=30, ignore_eos=True))
    engine.add_request("b", {"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()
    engine.abort_request("a")
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["b"]
    assert engine.kv_cache_manager.block_pool.num_free_blocks == engine.kv_cache_manager.num_blocks
    with pytest.raises(ValueError, match="request_id 'x' is already in use"):
        engine.add_request("x", {"prompt_token_ids": [3]})
        engine.add_request("x", {"prompt_token_ids": [3]})
    engine.abort_request(["x"])


@pytest.mark.slow
def test_incremental_detokenizer_never_emits_broken_characters(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = "Café 🤖 naïve — 東京 ok"
    ids = tok(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tok, [], stop=[])
    pieces = [detok.append(t) for t in ids]
    assert "".join(pieces) == tok.decode(ids) == detok.text
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces)  # multi-byte characters were held back at least once


@pytest.mark.slow
def test_smollm2_chat_generation_stops_at_eos(smollm2_dir):
    llm = LLM("smollm2-135m", milestone="M3", max_model_len=512)
    tok = llm.get_tokenizer()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == 2
    assert "Paris" in out.text


def test_async_scheduling_changes_no_output(tiny_checkpoint):
    """Step n+1 launched before step n's tokens are seen: greedy, seeded, n>1 forks, stops, logprobs,
    preemption under a tight pool and an abort all give what the synchronous engine gives."""
    folder = str(tiny_checkpoint("qwen3"))
    prompts = [{"prompt_token_ids": [(5 * i + j) % 500 + 3 for j in range(6 + 3 * i)]} for i in range(6)]
    params = [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=7, max_tokens=15, ignore_eos=True, logprobs=1),
        SamplingParams(temperature=0.9, n=3, seed=11, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[100 + k for k in range(300)]),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.8, seed=3, max_tokens=25, ignore_eos=True),
    ]
    results, logprobs = {}, {}
    for async_scheduling in (False, True):
        llm = LLM(
            folder,
            milestone="M3",
            max_model_len=64,
            kv_cache_memory=24 * 4 * 2 * 2 * 2 * 16 * 4,
            block_size=4,
            async_scheduling=async_scheduling,
        )
        outs = llm.generate(prompts, params, use_tqdm=False)
        results[async_scheduling] = [[(c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]
        logprobs[async_scheduling] = outs[1].outputs[0].logprobs
        assert llm.llm_engine.scheduler.num_preemptions > 0
        engine = llm.llm_engine
        engine.add_request("a", prompts[0], SamplingParams(max_tokens=30, ignore_eos=True))
        engine.add_request("b", prompts[1], SamplingParams(max_tokens=5, ignore_eos=True))
        engine.step()
        engine.step()
        engine.abort_request("a")
        finished = []
        while engine.has_unfinished_requests():
            finished += [(o.request_id, len(o.outputs[0].token_ids)) for o in engine.step() if o.finished]
        assert finished == [("b", 5)]
        assert engine.kv_cache_manager.block_pool.num_free_blocks == engine.kv_cache_manager.num_blocks
    assert results[True] == results[False]
    assert any(r[0][1] == "stop" for r in results[True])  # a stop token landed mid-flight
    # (preemption differs, so batches differ: logprobs agree to float rounding, not bit for bit)
    assert [d.keys() for d in logprobs[True]] == [d.keys() for d in logprobs[False]]
    flat = {k: [v for d in lps for v in d.values()] for k, lps in logprobs.items()}
    assert flat[True] == pytest.approx(flat[False], rel=1e-4)


@pytest.mark.parametrize(
    "extra",
    [
        dict(max_num_batched_tokens=8),
        dict(max_num_batched_tokens=16, long_prefill_token_threshold=5),
        dict(max_num_batched_tokens=12, async_scheduling=False),
        dict(max_num_batched_tokens=32, target_itl_ms=1.0),
    ],
)
def test_chunked_prefill_changes_no_output(tiny_checkpoint, extra):
    """Budgets far below the prompt lengths (M5) against whole-prompt steps (M4): greedy, seeded,
    n>1 forks after a chunked prompt, stop strings and token ids, logprobs."""
    folder = str(tiny_checkpoint("qwen3"))
    prompts = [{"prompt_token_ids": [(5 * i + j) % 500 + 3 for j in range(20 + 13 * i)]} for i in range(5)]
    params = [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=7, max_tokens=15, ignore_eos=True, logprobs=1),
        SamplingParams(temperature=0.9, n=3, seed=11, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[100 + k for k in range(300)]),
        SamplingParams(temperature=1.0, top_p=0.8, seed=3, max_tokens=25, ignore_eos=True, stop=["w36"]),
    ]
    results, logprobs = {}, {}
    for milestone, kw in (("M4", {}), ("M5", extra)):
        llm = LLM(folder, milestone=milestone, max_model_len=128, kv_cache_memory=2**22, block_size=4, **kw)
        outs = llm.generate(prompts, params, use_tqdm=False)
        results[milestone] = [[(c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]
        logprobs[milestone] = [v for d in outs[1].outputs[0].logprobs for v in d.values()]
        stats = llm.llm_engine.stats
        assert stats.num_tokens <= stats.num_steps * llm.llm_engine.config.scheduler_config.max_num_batched_tokens
    assert results["M5"] == results["M4"]
    assert [r[0][1:] for r in results["M5"][3:]] == [("stop", 192), ("stop", "w36")]
    assert logprobs["M5"] == pytest.approx(logprobs["M4"], rel=1e-4)


def test_chunked_prefill_lifts_the_budget_check(tiny_checkpoint):
    folder = str(tiny_checkpoint("llama"))
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(16\) must be >= max_model_len \(64\)"):
        LLM(folder, milestone="M4", max_model_len=64, max_num_batched_tokens=16, kv_cache_memory=2**20)
    llm = LLM(
        folder, milestone="M5", max_model_len=64, max_num_batched_tokens=16, kv_cache_memory=2**20, collect_step_stats=True
    )
    out = llm.generate({"prompt_token_ids": [3] * 40}, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)[
        0
    ].outputs[0]
    assert len(out.token_ids) == 4
    assert [s.num_tokens for s in llm.llm_engine.step_stats] == [16, 16, 8, 1, 1, 1]
