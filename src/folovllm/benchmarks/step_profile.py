"""``folovllm bench step``: where one decode step's time goes, host vs GPU, launch by launch.

A batch of requests is prefilled, then decode steps are timed (mean wall time,
the engine's own host/forward split) and one more is recorded with
``torch.profiler``: every kernel the GPU ran, every launch the host issued, and
a timeline of both that the M4 chapter draws. Comparing M3 (eager, unfused) with
M4 (fused kernels, CUDA graphs) shows what the fast path removed.
"""

from __future__ import annotations

import gc
import itertools
import statistics
import time
from typing import Any

import torch

from folovllm.benchmarks.common import parse_config, provenance
from folovllm.benchmarks.hardware import measure_copy_bandwidth
from folovllm.engine.llm_engine import EngineStats
from folovllm.entrypoints.llm import LLM
from folovllm.sampling_params import SamplingParams

# Host calls that put work on the GPU: runtime and driver kernel launches (Triton uses the driver), graph launches.
LAUNCH_CALLS = (
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaGraphLaunch",
    "cudaMemcpyAsync",
    "cudaMemsetAsync",
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """Total time covered by possibly overlapping ``(start, end)`` intervals (µs in, ms out)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total / 1e3


def record_profile(fn, device: torch.device, timeline: bool = True) -> dict[str, Any]:
    """Run ``fn()`` under ``torch.profiler``: GPU kernels (count, busy time, the 15 costliest by name),
    host launches (count, time inside them: the rest of the host's time is Python and waiting), wall time,
    and (``timeline``) every kernel's and launch's span."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    wall_ms = (time.perf_counter() - start) * 1e3
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    launches = [e for e in events if e.name in LAUNCH_CALLS]
    origin = min([e.time_range.start for e in events] or [0.0])

    def span(e) -> list[float]:
        return [round((e.time_range.start - origin) / 1e3, 4), round(e.time_range.elapsed_us() / 1e3, 4)]

    by_name: dict[str, list[float]] = {}
    for e in kernels:
        entry = by_name.setdefault(e.name[:80], [0, 0.0])
        entry[0] += 1
        entry[1] += e.time_range.elapsed_us() / 1e3
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:15]
    row = {
        "num_gpu_kernels": len(kernels),
        "num_host_launches": len(launches),
        "host_launch_ms": sum(e.time_range.elapsed_us() for e in launches) / 1e3,  # inside the driver calls alone
        "top_kernels": [{"name": n, "count": c, "total_ms": round(ms, 4)} for n, (c, ms) in top],
        "gpu_busy_ms": _union_ms([(e.time_range.start, e.time_range.end) for e in kernels]),
        "profiled_wall_ms": wall_ms,
    }
    if timeline:
        row["timeline"] = {"gpu_kernels": [span(e) for e in kernels], "host_launches": [span(e) for e in launches]}
    return row


def profile_decode(
    llm: LLM, batch_size: int, prompt_len: int, steps: int = 20, seed: int = 0, timeline: bool = True
) -> dict[str, Any]:
    """Decode-step figures for ``batch_size`` running requests of ``prompt_len``-token prompts."""
    engine = llm.llm_engine
    device = engine.config.device
    gen = torch.Generator().manual_seed(seed)
    budget = engine.max_model_len - prompt_len
    if budget < steps + 8:
        raise ValueError(
            f"max_model_len ({engine.max_model_len}) leaves no room for {steps + 8} decode steps "
            f"after a {prompt_len}-token prompt"
        )
    params = SamplingParams(temperature=0.0, max_tokens=budget, ignore_eos=True)
    ids = [f"profile-{i}" for i in range(batch_size)]
    for rid in ids:
        prompt = torch.randint(0, min(engine.vocab_size, 10000), (prompt_len,), generator=gen).tolist()
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    sched = engine.scheduler
    while len(sched.running) < batch_size or any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running):
        engine.step()
    for _ in range(3):  # warm-up decode steps (Triton JIT, allocator)
        engine.step()
    engine.stats = EngineStats()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    _sync(device)
    wall_ms = (time.perf_counter() - start) / steps * 1e3
    st = engine.stats
    row = {
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "wall_ms_per_step": wall_ms,
        "host_ms_per_step": st.host_time / st.num_steps * 1e3,
        "forward_ms_per_step": st.forward_time / st.num_steps * 1e3,
        **record_profile(engine.step, device, timeline),
    }
    engine.abort_request(ids)
    return row


def profile_prefill(
    llm: LLM, batch_size: int, prompt_len: int, repeats: int = 5, seed: int = 0, timeline: bool = True
) -> dict[str, Any]:
    """Figures for the step that prefills ``batch_size`` fresh ``prompt_len``-token prompts (one token each).

    One untimed run of the same shape first (allocator, cuBLAS heuristics); then ``repeats`` timed
    runs, from adding the requests until their tokens are out (TTFT as the engine sees it), and one
    profiled. Fresh random prompts every run, so a prefix cache never hits.
    """
    engine = llm.llm_engine
    device = engine.config.device
    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    runs = itertools.count()  # request ids stay unique across runs

    def run() -> None:
        n = next(runs)
        for i in range(batch_size):
            prompt = torch.randint(0, min(engine.vocab_size, 10000), (prompt_len,), generator=gen).tolist()
            engine.add_request(f"prefill-{n}-{i}", {"prompt_token_ids": prompt}, params)
        while engine.has_unfinished_requests():
            engine.step()

    run()
    walls = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        walls.append((time.perf_counter() - start) * 1e3)
    return {
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "wall_ms": statistics.median(walls),
        "wall_ms_runs": walls,
        **record_profile(run, device, timeline),
    }


def bench_step(
    model: str,
    configs: list[str],
    batch_sizes: list[int],
    prompt_len: int = 128,
    steps: int = 20,
    device: str | None = None,
    dtype: str | None = None,
    timeline: bool = True,
    prefill: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """``profile_decode`` for every (milestone, batch size), with the weight-read floor of a decode step (each
    config's own, ``weights_floor_ms`` per row: ``M7/gptq`` reads fewer bytes than the bf16 configs beside it).

    ``timeline=False`` drops each row's kernel and launch timeline (thousands of numbers per eager
    step) and keeps the counts, the busy time and the top kernels. ``prefill`` profiles the
    prefill step instead (``profile_prefill``; ``steps`` is then its number of timed runs), with the
    token budget raised so that every config prefills the prompts in one step: under M5's chunked
    presets that is an unchunked prefill, the step chunking would have split.
    """
    rows, meta, floor = [], None, None
    max_model_len = prompt_len + steps + 64
    budget = {"max_num_batched_tokens": max(max(batch_sizes) * prompt_len, max_model_len)} if prefill else {}
    for milestone in configs:
        as_of, variant, _ = parse_config(milestone)
        llm = LLM(
            model,
            milestone=as_of,
            device=device,
            dtype=dtype,
            max_num_seqs=max(batch_sizes),
            **{"max_model_len": max_model_len, **budget, **variant, **overrides},
        )
        engine = llm.llm_engine
        weight_bytes = sum(p.numel() * p.element_size() for p in engine.model_runner.model.parameters())
        if meta is None:
            dev, dt = engine.config.device, engine.config.model_config.dtype
            meta = provenance(dev, model, dt)
            floor = {"weight_bytes": weight_bytes, "copy_GBps": measure_copy_bandwidth(dev)}
        own_floor_ms = weight_bytes / (floor["copy_GBps"] * 1e9) * 1e3  # a quantized config reads fewer bytes
        floor.setdefault("weights_floor_ms", own_floor_ms)  # the top-level floor is the first config's
        runner = engine.model_runner
        graphs = runner.cuda_graphs
        for bs in batch_sizes:
            row = {
                "milestone": milestone,
                "weight_bytes": weight_bytes,
                "weights_floor_ms": own_floor_ms,
                "block_size": engine.config.cache_config.block_size,
                "attention_backend": engine.model_runner.backend_name,
                "cuda_graphs": graphs is not None,
                "fused_kernels": engine.model_runner.fused,
            }
            if prefill:
                row.update(profile_prefill(llm, bs, prompt_len, steps, timeline=timeline))
            else:
                row.update(profile_decode(llm, bs, prompt_len, steps, timeline=timeline))
                row["wall_vs_weights_floor"] = row["wall_ms_per_step"] / own_floor_ms
            rows.append(row)
        if graphs is not None:
            rows[-1]["cuda_graph_capture_s"] = runner.graph_capture_seconds
            rows[-1]["cuda_graph_memory_MiB"] = runner.graph_memory_bytes / 2**20
        del llm, engine, runner, graphs  # the runner holds the KV cache: the next engine profiles free memory
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    wall = "wall_ms" if prefill else "wall_ms_per_step"
    summary = {f"{r['milestone']}@{r['batch_size']}": round(r[wall], 3) for r in rows}
    return {
        "benchmark": "prefill_step" if prefill else "decode_step",
        **meta,
        "workload": {"batch_sizes": batch_sizes, "prompt_len": prompt_len, "steps": steps, "overrides": overrides},
        "floor": floor,
        wall: summary,
        "results": rows,
    }
