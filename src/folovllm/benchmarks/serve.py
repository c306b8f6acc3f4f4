"""``folovllm bench serve``: requests arriving over time, latencies as each client sees them.

Arrivals are a Poisson process at ``request_rate`` (``inf``: all at once), at most
``max_concurrency`` in flight; several rates give one row per (config, rate), the points
of a throughput-latency curve, from one engine per config. The same workload goes through
one of two transports: in-process through ``AsyncLLM`` (one engine per config, as
``bench throughput`` takes them) or over HTTP to a running ``folovllm serve`` (``base_url``),
streaming, so their difference is what the server costs per request and per token.

Per request: TTFT (send to first token), every inter-token gap (ITL), TPOT
((latency - TTFT) / (tokens - 1)) and end-to-end latency (E2EL); aggregated as
mean/median/std/p90/p99 under vLLM's ``benchmark_serving`` names (``mean_ttft_ms``, ``p99_itl_ms`` ...).
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import random
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from folovllm.benchmarks.common import (
    mixed_workload,
    parse_config,
    phased_workload,
    provenance,
    random_workload,
    save_json,
)
from folovllm.config import resolve_device, resolve_dtype
from folovllm.core.sched.cost_model import StepCostModel
from folovllm.engine.async_llm import AsyncLLM
from folovllm.engine.llm_engine import LLMEngine, StepStats
from folovllm.entrypoints.llm import LLM
from folovllm.sampling_params import RequestOutputKind, SamplingParams
from folovllm.triton_utils.jit_watch import watch_compiles

WORKLOADS = ("random", "mixed", "phased")
PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """One request as its client saw it; ``token_times`` are arrival stamps, one per token."""

    prompt_len: int
    expected_output_len: int
    start: float = 0.0
    end: float = 0.0
    token_times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and len(self.token_times) == self.expected_output_len

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def itl(self) -> list[float]:
        """Every gap between two tokens; tokens that arrived in one chunk are 0 apart."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.latency - self.ttft) / (n - 1) if n > 1 else None

    def record(self, detailed: bool) -> dict[str, Any]:
        row: dict[str, Any] = {
            "prompt_len": self.prompt_len,
            "output_len": len(self.token_times),
            "ttft_s": self.ttft if self.token_times else None,
            "tpot_s": self.tpot,
            "e2el_s": self.latency,
            "error": self.error,
        }
        if detailed:
            row["itl_s"] = self.itl
        return row


Send = Callable[[int, list[int], int], Awaitable[RequestResult]]


async def run_workload(
    send: Send, prompts: list[list[int]], outputs: list[int], request_rate: float, max_concurrency: int | None, seed: int
) -> tuple[list[RequestResult], float]:
    """Dispatch every request at its Poisson arrival time; returns the results and the wall time."""
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(i: int) -> RequestResult:
        if limit is None:
            return await send(i, prompts[i], outputs[i])
        async with limit:
            return await send(i, prompts[i], outputs[i])

    start = time.perf_counter()
    tasks = []
    for i in range(len(prompts)):
        tasks.append(asyncio.create_task(one(i)))
        if not math.isinf(request_rate) and i + 1 < len(prompts):
            await asyncio.sleep(rng.expovariate(request_rate))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def inprocess_sender(engine: AsyncLLM, tag: str) -> Send:
    """Requests straight into ``AsyncLLM.generate`` (greedy, ``ignore_eos``: exactly the asked length)."""

    async def send(i: int, prompt: list[int], max_tokens: int) -> RequestResult:
        result = RequestResult(len(prompt), max_tokens, start=time.perf_counter())
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        try:
            async for out in engine.generate({"prompt_token_ids": prompt}, params, f"{tag}-{i}"):
                now = time.perf_counter()
                result.token_times += [now] * len(out.outputs[0].token_ids)
        except Exception as err:  # recorded, counted as failed
            result.error = f"{type(err).__name__}: {err}"
        result.end = time.perf_counter()
        return result

    return send


def http_sender(client: Any, base_url: str, model: str) -> Send:
    """Streaming ``/v1/completions`` with token ids back (``return_token_ids``), stamping each chunk's arrival."""

    async def send(i: int, prompt: list[int], max_tokens: int) -> RequestResult:
        payload = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "return_token_ids": True,
        }
        result = RequestResult(len(prompt), max_tokens, start=time.perf_counter())
        try:
            async with client.stream("POST", f"{base_url}/v1/completions", json=payload) as resp:
                if resp.status_code != 200:
                    result.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:500]}"
                else:
                    await _read_events(resp, result)
        except Exception as err:  # recorded, counted as failed
            result.error = f"{type(err).__name__}: {err}"
        result.end = time.perf_counter()
        return result

    return send


async def _read_events(resp: Any, result: RequestResult) -> None:
    async for line in resp.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            return
        now = time.perf_counter()
        chunk = json.loads(data)
        if "error" in chunk:
            result.error = chunk["error"]["message"]
            return
        for choice in chunk["choices"]:
            result.token_times += [now] * len(choice.get("token_ids") or [])


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """vLLM ``benchmark_serving``'s aggregate fields over the completed requests."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(len(r.token_times) for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    row: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
    }
    return row | latency_summary(ok)


def latency_summary(ok: list[RequestResult]) -> dict[str, float]:
    """Mean, median, std and percentiles of TTFT, TPOT, ITL and end-to-end latency (ms) of completed requests."""
    row: dict[str, float] = {}
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [t for r in ok if (t := r.tpot) is not None],
        "itl": [g for r in ok for g in r.itl],
        "e2el": [r.latency for r in ok],
    }
    for name, values in series.items():
        ms = np.array(values or [math.nan]) * 1e3
        row[f"mean_{name}_ms"] = float(ms.mean())
        row[f"median_{name}_ms"] = float(np.median(ms))
        row[f"std_{name}_ms"] = float(ms.std())
        for p in PERCENTILES[1:]:
            row[f"p{p}_{name}_ms"] = float(np.percentile(ms, p))
    return row


def phase_summaries(results: list[RequestResult]) -> list[dict[str, Any]]:
    """The phased workload's two halves apart (by arrival order): each half's latency percentiles."""
    first = len(results) // 2
    halves = {"first half (W)": results[:first], "second half (long prompts mixed in)": results[first:]}
    return [{"phase": name, "completed": sum(r.ok for r in part), **latency_summary([r for r in part if r.ok])}
            for name, part in halves.items()]  # fmt: skip


def _warm_up_send(send: Send) -> None:
    asyncio.run(send(-1, [1, 2, 3, 4], 4))


Run = tuple[dict[str, Any], list[RequestResult]]  # one (config, rate) row and its requests


def step_summary(stats: list[StepStats]) -> dict[str, Any]:
    """The engine's own steps of one run, decode-only apart from those carrying prompt tokens: how many,
    their tokens, and the forward time the engine measured (ms; p50/p99) next to its host time."""

    def kind(steps: list[StepStats]) -> dict[str, Any]:
        if not steps:
            return {"steps": 0}
        forward = np.array([st.forward_time for st in steps]) * 1e3
        return {
            "steps": len(steps),
            "mean_tokens": float(np.mean([st.num_tokens for st in steps])),
            "mean_forward_ms": float(forward.mean()),
            "p50_forward_ms": float(np.percentile(forward, 50)),
            "p99_forward_ms": float(np.percentile(forward, 99)),
            "mean_host_ms": float(np.mean([st.host_time for st in steps]) * 1e3),
        }

    mixed = [st for st in stats if any(prefill for _, _, prefill in st.scheduled)]
    decode = [st for st in stats if st.scheduled and not any(prefill for _, _, prefill in st.scheduled)]
    return {"decode_only": kind(decode), "with_prompt_tokens": kind(mixed)}


def _engine_records(engine: LLMEngine) -> dict[str, Any]:
    """What the engine kept about the run just finished: step summaries (``collect_step_stats``) and the
    dynamic chunk sizing's fitted step-cost model (``target_itl_ms``)."""
    out: dict[str, Any] = {}
    if engine.config.collect_step_stats:
        out["engine_steps"] = step_summary(list(engine.step_stats))
    if engine.config.scheduler_config.target_itl_ms is not None:
        sched = engine.scheduler
        coef = sched.cost_model.coef
        out["cost_model"] = {
            "coef_s": None if coef is None else [float(c) for c in coef],
            "terms": ["fixed", "any prompt tokens", "per token", "per context token", "per (query, key) pair"],
            "num_samples": sched.cost_model.num_samples,
            "num_target_out_of_reach": sched.num_target_out_of_reach,
            "num_outliers": sched.cost_model.num_outliers,
            "tail_factor": sched.cost_model.tail_factor,
            "calibrated": sched.cost_model.calibrated,
            "calibration": sched.cost_model.calibration,
            "window": sched.cost_model.window(),
            "steered_steps": steered_steps(sched.cost_model),
        }
    return out


def steered_steps(model: StepCostModel) -> dict[str, Any]:
    """Every step of the run the tail factor was steered by: prompt-carrying steps as arrays (predicted and
    measured ms, the factor after each), decode-only ones counted, with how many ran over the target."""
    prompt = [s for s in model.steered if s[2]]
    decode_over = sum(1 for s in model.steered if not s[2] and s[1] > model.target)
    return {
        "target_ms": model.target * 1e3,
        "num_decode_only": len(model.steered) - len(prompt),
        "num_decode_only_over_target": decode_over,
        "num_prompt_over_target": sum(1 for s in prompt if s[1] > model.target),
        "prompt_predicted_ms": [round(s[0] * 1e3, 3) for s in prompt],
        "prompt_measured_ms": [round(s[1] * 1e3, 3) for s in prompt],
        "prompt_tail_factor": [round(s[3], 4) for s in prompt],
    }


def run_inprocess(
    model: str,
    spec: str,
    prompts: list[list[int]],
    outputs: list[int],
    request_rates: Sequence[float],
    max_concurrency: int | None,
    seed: int,
    device: str | None,
    dtype: str | None,
    overrides: dict[str, Any],
) -> list[Run]:
    """One engine config, built like ``bench throughput`` builds it, behind ``AsyncLLM``; the workload at each rate."""
    milestone, extra, limit = parse_config(spec)
    prompts, outputs = prompts[:limit], outputs[:limit]
    llm = LLM(model, milestone=milestone, device=device, dtype=dtype, **extra, **overrides)
    engine = AsyncLLM(llm.llm_engine)
    try:
        prompts = [[t % engine.engine.vocab_size for t in p] for p in prompts]  # tiny test vocabularies
        _warm_up_send(inprocess_sender(engine, "warmup"))
        cfg = llm.llm_engine.config
        about = {
            "config": spec,
            "transport": "inprocess",
            "milestone": milestone,
            "batching": cfg.scheduler_config.batching,
            "kv_layout": cfg.cache_config.kv_layout,
            "attention_backend": llm.llm_engine.model_runner.backend_name,
            "num_kv_blocks": llm.llm_engine.kv_cache_manager.num_blocks,
        }
        runs = []
        for k, rate in enumerate(request_rates):  # no local keeps the engine alive past ``finally`` (its memory)
            llm.llm_engine.step_stats.clear()  # this rate's steps only (not the warm-up's, not the last rate's)
            llm.llm_engine.scheduler.cost_model.steered.clear()
            with watch_compiles() as compiled:
                results, duration = asyncio.run(
                    run_workload(inprocess_sender(engine, f"req{k}"), prompts, outputs, rate, max_concurrency, seed)
                )
            row = {**about, "request_rate": rate, **summarize(results, duration), **_engine_records(llm.llm_engine)}
            row.update(compiled.record())  # kernels JIT-compiled while this rate ran
            runs.append((row, results))
    finally:
        engine.shutdown(drain=False)
        del llm, engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return runs


def run_http(
    base_url: str,
    prompts: list[list[int]],
    outputs: list[int],
    request_rates: Sequence[float],
    max_concurrency: int | None,
    seed: int,
) -> tuple[list[Run], str]:
    """The workload against a running server at each rate; the model is the one it serves."""
    import httpx2

    async def main() -> tuple[list[tuple[list[RequestResult], float]], str]:
        limits = httpx2.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        async with httpx2.AsyncClient(timeout=None, limits=limits, trust_env=False) as client:
            models = (await client.get(f"{base_url}/v1/models")).json()["data"]
            send = http_sender(client, base_url, models[0]["id"])
            await send(-1, [1, 2, 3, 4], 4)  # warm-up: connection, first-request paths
            timed = [await run_workload(send, prompts, outputs, rate, max_concurrency, seed) for rate in request_rates]
            return timed, models[0]["id"]

    timed, model = asyncio.run(main())
    runs = [
        ({"config": base_url, "transport": "http", "request_rate": rate, **summarize(results, duration)}, results)
        for rate, (results, duration) in zip(request_rates, timed)
    ]
    return runs, model


def bench_serve(
    model: str,
    configs: list[str],
    workload: str = "random",
    num_prompts: int = 256,
    input_len: tuple[int, int] = (100, 1024),
    output_len: tuple[int, int] = (100, 1024),
    long_input_len: tuple[int, int] = (4096, 8192),
    long_fraction: float = 0.1,
    seed: int = 0,
    vocab_size: int = 10000,
    subset: int | None = None,
    request_rate: float | Sequence[float] = math.inf,
    max_concurrency: int | None = None,
    base_url: str | None = None,
    save_detailed: bool = False,
    baseline: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    out: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Run the workload in-process under each config, or once over HTTP when ``base_url`` is given.

    Several ``request_rate`` values give one row per (config, rate), in that order, each config's
    engine built once. ``baseline``: a results file of an earlier run (e.g. in-process) whose rows
    are kept in this file, its last row compared with this run's first (``overhead_vs_baseline``).
    """
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    rates = [request_rate] if isinstance(request_rate, (int, float)) else list(request_rate)
    if not rates:
        raise ValueError("request_rate needs at least one rate")
    for rate in rates:
        if not rate > 0:
            raise ValueError(f"request_rate must be positive (inf: all at once), got {rate!r}")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
    if workload in ("mixed", "phased"):
        make = mixed_workload if workload == "mixed" else phased_workload
        prompts, outputs = make(num_prompts, input_len, output_len, long_input_len, long_fraction, seed, vocab_size)
    else:
        prompts, outputs = random_workload(num_prompts, input_len, output_len, seed, vocab_size)
    prompts, outputs = prompts[:subset], outputs[:subset]
    spec = {
        "name": workload,
        "num_prompts": len(prompts),
        "input_len": list(input_len),
        "output_len": list(output_len),
        "seed": seed,
        "vocab_size": vocab_size,
        "subset": subset,
        "request_rate": rates[0] if len(rates) == 1 else rates,
        "max_concurrency": max_concurrency,
        **({"long_input_len": list(long_input_len), "long_fraction": long_fraction} if workload != "random" else {}),
    }
    base = _load_baseline(baseline, spec) if baseline else None
    dev = resolve_device(device)
    rows: list[dict[str, Any]] = []
    meta_model = model
    for config in [base_url] if base_url else configs:
        if base_url:
            runs, meta_model = run_http(base_url, prompts, outputs, rates, max_concurrency, seed)
        else:
            runs = run_inprocess(model, config, prompts, outputs, rates, max_concurrency, seed, device, dtype, overrides)
        for row, results in runs:
            row["requests"] = [r.record(save_detailed) for r in results]
            if workload == "phased":
                row["phases"] = phase_summaries(results)
            rows.append(row)
            print(
                f"[{row['config']} @ {row['request_rate']} req/s] {row['completed']}/{len(results)} done, "
                f"{row['output_throughput']:.0f} tok/s, TTFT p99 {row['p99_ttft_ms']:.1f} ms, "
                f"ITL p99 {row['p99_itl_ms']:.1f} ms",
                file=sys.stderr,
            )
            failed = next((r.error for r in results if not r.ok), None)
            if failed:
                print(f"[{row['config']}] first failure: {failed}", file=sys.stderr)
    payload = {
        "benchmark": "serve",
        **provenance(dev, meta_model, resolve_dtype(dtype, dev)),
        "workload": {**spec, "prompt_tokens": sum(map(len, prompts)), "output_tokens": sum(outputs), "overrides": overrides},
        "results": rows,
    }
    if base is not None:
        _add_baseline(payload, base, baseline)
    if out:
        save_json(out, payload)
    return payload


METRICS_COMPARED = tuple(
    f"{stat}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "p99")
)  # what a server adds, at the center and in the tail


def _load_baseline(path: str, spec: dict[str, Any]) -> dict[str, Any]:
    """An earlier results file, refused unless it ran this very workload."""
    base = json.loads(Path(path).read_text())
    ran = {k: base.get("workload", {}).get(k) for k in spec}
    if ran != spec:
        raise ValueError(f"baseline {path} ran a different workload: {ran}, this run is {spec}")
    return base


def _add_baseline(payload: dict[str, Any], base: dict[str, Any], path: str) -> None:
    """Put the baseline's rows first, and this run minus its last row (the first may have paid JIT) beside them."""
    ref, row = base["results"][-1], payload["results"][0]
    payload["baseline"] = {"file": path, "command": base.get("command"), "commit": base.get("commit")}
    payload["overhead_vs_baseline"] = {
        **{f"{k}_delta": row[k] - ref[k] for k in METRICS_COMPARED},
        "output_throughput_ratio": row["output_throughput"] / ref["output_throughput"],
    }
    payload["results"] = base["results"] + payload["results"]
