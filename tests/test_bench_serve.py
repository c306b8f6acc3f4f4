"""``folovllm bench serve``: the mixed workload, the percentile fields on hand-made timings, Poisson
dispatch under a concurrency limit, and both transports end to end on a tiny model."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from folovllm.benchmarks.common import mixed_workload, phased_workload, random_workload
from folovllm.benchmarks.serve import RequestResult, bench_serve, phase_summaries, run_workload, summarize
from folovllm.cli import main
from folovllm.core.sched.cost_model import StepCostModel
from folovllm.engine.async_llm import AsyncLLM
from folovllm.entrypoints.openai.api_server import ServerThread

TINY = ["--model", "random:tiny-llama", "--device", "cpu", "--max-model-len", "128", "--kv-cache-memory", str(2**20)]


def test_mixed_workload_is_w_with_seeded_long_prompts():
    short, outputs = random_workload(40, (10, 20), (5, 9), seed=3)
    prompts, mixed_outputs = mixed_workload(40, (10, 20), (5, 9), (100, 120), 0.25, seed=3)
    assert mixed_outputs == outputs and mixed_workload(40, (10, 20), (5, 9), (100, 120), 0.25, seed=3)[0] == prompts
    long = [i for i, p in enumerate(prompts) if len(p) >= 100]
    assert len(long) == 10 and all(len(prompts[i]) <= 120 for i in long)
    assert all(prompts[i] == short[i] for i in range(40) if i not in long)
    assert long != list(range(10))  # spread through the arrival order
    with pytest.raises(ValueError, match="long_fraction must be in \\[0, 1\\], got 1.5"):
        mixed_workload(long_fraction=1.5)


def test_phased_workload_is_w_then_mixed():
    prompts, outputs = phased_workload(41, (10, 20), (5, 9), (100, 120), 0.5, seed=3)
    assert (prompts[:20], outputs[:20]) == random_workload(20, (10, 20), (5, 9), seed=3)
    assert (prompts[20:], outputs[20:]) == mixed_workload(21, (10, 20), (5, 9), (100, 120), 0.5, seed=5)
    assert max(map(len, prompts[:20])) <= 20 and sum(len(p) >= 100 for p in prompts[20:]) == 10


def test_phase_summaries_split_the_requests_by_arrival_order():
    early = [RequestResult(10, 2, start=0.0, end=0.3, token_times=[0.1, 0.3])]  # TTFT 100 ms
    late = [RequestResult(10, 2, start=1.0, end=1.6, token_times=[1.4, 1.6]), RequestResult(10, 2, error="boom")]
    first, second = phase_summaries(early + late)
    assert (first["completed"], second["completed"]) == (1, 1)
    assert first["median_ttft_ms"] == pytest.approx(100) and second["median_ttft_ms"] == pytest.approx(400)
    assert second["p99_itl_ms"] == pytest.approx(200)


def test_summary_fields_on_hand_made_timings():
    a = RequestResult(10, 3, start=0.0, end=0.5, token_times=[0.1, 0.3, 0.5])  # TTFT 100 ms, gaps 200, 200
    b = RequestResult(20, 2, start=1.0, end=1.4, token_times=[1.3, 1.3])  # two tokens in one chunk: gap 0
    failed = RequestResult(5, 4, start=0.0, end=0.1, error="HTTP 400: no")
    row = summarize([a, b, failed], duration=2.0)
    assert (row["completed"], row["failed"], row["total_input_tokens"], row["total_output_tokens"]) == (2, 1, 30, 5)
    assert row["request_throughput"] == 1.0 and row["output_throughput"] == 2.5
    assert row["mean_ttft_ms"] == pytest.approx(200.0) and row["median_ttft_ms"] == pytest.approx(200.0)
    assert row["mean_itl_ms"] == pytest.approx(400 / 3) and row["p99_itl_ms"] == pytest.approx(200.0)
    assert row["mean_tpot_ms"] == pytest.approx((200 + 100) / 2)  # (latency - TTFT) / (tokens - 1)
    assert row["mean_e2el_ms"] == pytest.approx(450.0)
    assert a.record(detailed=True)["itl_s"] == pytest.approx([0.2, 0.2])
    assert math.isnan(summarize([failed], 1.0)["mean_ttft_ms"])


def test_poisson_dispatch_respects_the_concurrency_limit():
    active, peak, starts = 0, 0, []

    async def send(i: int, prompt: list[int], max_tokens: int) -> RequestResult:
        nonlocal active, peak
        loop = asyncio.get_running_loop()
        starts.append(loop.time())
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.01)
        active -= 1
        return RequestResult(len(prompt), max_tokens, token_times=[0.0] * max_tokens)

    prompts, outputs = [[1]] * 30, [1] * 30
    results, duration = asyncio.run(run_workload(send, prompts, outputs, 1000.0, 4, seed=0))
    assert len(results) == 30 and peak == 4
    results, _ = asyncio.run(run_workload(send, prompts, outputs, math.inf, None, seed=0))
    assert peak == 30  # all at once


def test_cli_in_process_configs_json(tmp_path):
    out = tmp_path / "serve.json"
    rc = main(
        [
            "bench",
            "serve",
            *TINY,
            "--num-prompts",
            "12",
            "--input-len",
            "4:12",
            "--output-len",
            "3:8",
            "--milestone",
            "M2",
            "M4/naive",
            "--request-rate",
            "500",
            "--max-concurrency",
            "6",
            "--workload",
            "mixed",
            "--long-input-len",
            "40:60",
            "--long-fraction",
            "0.25",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "serve" and data["workload"]["name"] == "mixed"
    prompts, outputs = mixed_workload(12, (4, 12), (3, 8), (40, 60), 0.25)
    for row, config in zip(data["results"], ["M2", "M4/naive"]):
        assert (row["config"], row["transport"], row["completed"], row["failed"]) == (config, "inprocess", 12, 0)
        assert row["total_output_tokens"] == sum(outputs) and row["total_input_tokens"] == sum(map(len, prompts))
        assert [r["output_len"] for r in row["requests"]] == outputs
        for key in ("mean_ttft_ms", "median_tpot_ms", "p90_itl_ms", "p99_itl_ms", "p99_e2el_ms"):
            assert row[key] > 0
    assert data["results"][1]["attention_backend"] == "naive"


def test_several_rates_give_one_row_per_config_and_rate(tmp_path):
    out = tmp_path / "curve.json"
    load = ["--num-prompts", "6", "--input-len", "4:12", "--output-len", "3:6", "--seed", "1"]
    rc = main(["bench", "serve", *TINY, *load, "--milestone", "M2", "M3", "--request-rate", "200", "inf", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["workload"]["request_rate"] == [200.0, math.inf]
    rows = [(r["config"], r["request_rate"], r["completed"], r["failed"]) for r in data["results"]]
    assert rows == [("M2", 200.0, 6, 0), ("M2", math.inf, 6, 0), ("M3", 200.0, 6, 0), ("M3", math.inf, 6, 0)]
    outputs = random_workload(6, (4, 12), (3, 6), seed=1)[1]
    assert all([q["output_len"] for q in r["requests"]] == outputs for r in data["results"])


def test_http_against_in_process_baseline(tmp_path):
    baseline = tmp_path / "inprocess.json"
    common = {
        "num_prompts": 16,
        "input_len": (4, 12),
        "output_len": (3, 8),
        "vocab_size": 500,
        "seed": 1,
        "request_rate": 400.0,
    }
    bench_serve(
        "random:tiny-llama", ["M4"], device="cpu", max_model_len=128, kv_cache_memory=2**20, out=str(baseline), **common
    )
    engine = AsyncLLM.from_milestone("random:tiny-llama", "M4", device="cpu", max_model_len=128, kv_cache_memory=2**20)
    try:
        with ServerThread(engine, served_model_name="tiny") as server:
            url = server.url
            data = bench_serve("unused", [], base_url=url, baseline=str(baseline), save_detailed=True, **common)
    finally:
        engine.shutdown(drain=False)
    inproc, http = data["results"]
    assert (inproc["transport"], http["transport"], data["model"]) == ("inprocess", "http", "tiny")
    assert http["completed"] == 16 and http["total_output_tokens"] == inproc["total_output_tokens"]
    assert all(len(r["itl_s"]) == r["output_len"] - 1 for r in http["requests"])
    overhead = data["overhead_vs_baseline"]
    assert overhead["mean_ttft_ms_delta"] == pytest.approx(http["mean_ttft_ms"] - inproc["mean_ttft_ms"])
    assert overhead["p99_tpot_ms_delta"] == pytest.approx(http["p99_tpot_ms"] - inproc["p99_tpot_ms"])
    assert len(overhead) == 13  # mean, median and p99 of TTFT, TPOT, ITL and E2EL, and the throughput ratio
    with pytest.raises(ValueError, match="ran a different workload"):
        bench_serve("unused", [], base_url=url, baseline=str(baseline), **{**common, "num_prompts": 4})


def test_bad_options_are_errors(capsys):
    assert main(["bench", "serve", *TINY, "--request-rate", "4", "0"]) == 2
    assert "request_rate must be positive (inf: all at once), got 0.0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="request_rate needs at least one rate"):
        bench_serve("random:tiny-llama", ["M4"], request_rate=[])
    with pytest.raises(ValueError, match="workload must be one of"):
        bench_serve("random:tiny-llama", ["M4"], workload="bursty")
    with pytest.raises(ValueError, match="max_concurrency must be a positive integer"):
        bench_serve("random:tiny-llama", ["M4"], max_concurrency=0)


def test_each_engine_is_gone_before_its_memory_is_released(monkeypatch):
    """``run_inprocess`` frees an engine's GPU memory in ``finally`` (gc, then ``empty_cache``): nothing of
    the run may still reference the engine there, or the next config would find its KV cache allocated."""
    import gc
    import weakref

    from folovllm.benchmarks import serve

    engines: list[weakref.ref] = []
    real_init, real_collect = serve.AsyncLLM.__init__, gc.collect

    def tracked_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        engines.append(weakref.ref(self))

    def collect_and_check(*args):
        real_collect(*args)
        assert engines and engines[-1]() is None, "an AsyncLLM survived its run's teardown"

    monkeypatch.setattr(serve.AsyncLLM, "__init__", tracked_init)
    monkeypatch.setattr(serve.gc, "collect", collect_and_check)
    data = bench_serve(
        "random:tiny-llama", ["M4", "M4"], device="cpu", num_prompts=3, output_len=(2, 3), request_rate=[math.inf, 50.0]
    )
    assert len(data["results"]) == 4 and len(engines) == 2


def test_engine_steps_and_cost_model_are_recorded_per_row(tmp_path):
    """``--collect-step-stats`` summarizes each row's own engine steps (decode-only apart from steps with prompt
    tokens, the split behind M5's ITL tail), and a dynamic config records its fitted step-cost model."""
    out = tmp_path / "steps.json"
    load = ["--num-prompts", "6", "--input-len", "20:40", "--output-len", "4:8", "--seed", "2", "--collect-step-stats"]
    rc = main(["bench", "serve", *TINY, *load, "--milestone", "M5/budget=16", "M5/budget=16/itl=50", "--out", str(out)])
    assert rc == 0
    fixed, dynamic = json.loads(out.read_text())["results"]
    for row in (fixed, dynamic):
        steps = row["engine_steps"]
        assert steps["decode_only"]["steps"] > 0 and steps["with_prompt_tokens"]["steps"] >= 6 * 20 // 16
        assert steps["decode_only"]["mean_tokens"] <= 6 and steps["with_prompt_tokens"]["mean_tokens"] <= 16
    assert "cost_model" not in fixed
    model = dynamic["cost_model"]
    assert len(model["terms"]) == 5 and model["num_samples"] > 0
    assert model["calibrated"] and len(model["coef_s"]) == 5  # priced from designed steps before the first request
    calibration = model["calibration"]
    assert len(calibration["steps"]) == len(calibration["seconds"]) >= 5  # every family ran
    window = model["window"]  # the fit's inputs, one row per step it kept, and what the fit predicts for each
    assert len(window["features"]) == len(window["seconds"]) == len(window["measured_as"]) == model["num_samples"]
    assert set(window["measured_as"]) <= {"device", "interval"} and all(len(row) == 5 for row in window["features"])
    assert window["predicted"] == pytest.approx([sum(f * c for f, c in zip(row, model["coef_s"]))
                                                 for row in window["features"]])  # fmt: skip
    steered = model["steered_steps"]  # every served step after calibration, the prompt ones one by one
    measured = steered["prompt_measured_ms"]
    assert steered["target_ms"] == 50.0 and len(measured) >= 6 * 20 // 16
    assert len(steered["prompt_predicted_ms"]) == len(measured) == len(steered["prompt_tail_factor"])
    assert steered["num_prompt_over_target"] == sum(m > 50.0 for m in measured)
    assert all(1.0 <= f <= StepCostModel.MAX_TAIL_FACTOR for f in steered["prompt_tail_factor"])
    assert 0 <= steered["num_decode_only_over_target"] <= steered["num_decode_only"]


def test_phased_runs_report_each_half(tmp_path):
    out = tmp_path / "phased.json"
    load = ["--num-prompts", "8", "--input-len", "4:12", "--output-len", "3:6", "--long-input-len", "40:60"]
    rc = main(["bench", "serve", *TINY, *load, "--workload", "phased", "--long-fraction", "0.5", "--milestone", "M5",
               "--request-rate", "500", "--out", str(out)])  # fmt: skip
    assert rc == 0
    row = json.loads(out.read_text())["results"][0]
    assert [(p["phase"], p["completed"]) for p in row["phases"]] == [
        ("first half (W)", 4), ("second half (long prompts mixed in)", 4)
    ]  # fmt: skip
    assert all(p["p99_itl_ms"] > 0 for p in row["phases"])
