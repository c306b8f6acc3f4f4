"""``folovllm bench throughput``: one workload, several engine configurations, one run.

Each configuration is a milestone, optionally with variants: another batching
mode (``M2/sequential``, ``M2/static``), attention backend (``M3/naive``) or a
fast-path piece switched off (``M4/sync``); ``HF`` (or ``HF@N``) is HF
transformers' own continuous batching (``ContinuousBatchingManager``) on the
same weights and requests, the baseline the field compares with. Besides
tokens/s it reports how close the run came to the workload's hardware floor
and how much of each step was host (Python) time.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from typing import Any

import torch

from folovllm.benchmarks.common import parse_config, provenance, random_workload, save_json, split_prompt_limit
from folovllm.benchmarks.hardware import measure_copy_bandwidth, measure_matmul_tflops
from folovllm.config import resolve_device, resolve_dtype
from folovllm.engine.llm_engine import EngineStats
from folovllm.entrypoints.llm import LLM
from folovllm.sampling_params import SamplingParams
from folovllm.triton_utils.jit_watch import watch_compiles


def workload_floor(
    llm: LLM, prompts: list[list[int]], outputs: list[int], copy_gbps: float, matmul_tflops: float
) -> dict[str, float]:
    """The fastest this workload can run on this card, from bytes and FLOPs.

    Decode: every step reads all weights once, and every generated token reads
    its whole context's K/V once; at best all requests decode together, so
    there are ``max(outputs)`` decode steps. Prefill: 2 FLOPs per parameter per
    prompt token plus the causal attention matmuls, at the measured matmul rate.
    """
    engine = llm.llm_engine
    model = engine.model_runner.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    num_params = sum(p.numel() for p in model.parameters())
    kv_per_token = engine.model_runner.kv_bytes_per_token()
    kv_read = sum(kv_per_token * (len(p) * o + o * (o - 1) // 2) for p, o in zip(prompts, outputs))
    num_layers, _, head_dim = engine.model_runner.kv_shape
    num_heads = engine.hf_config.num_attention_heads
    prefill_flops = sum(2 * num_params * len(p) + 2 * num_layers * num_heads * head_dim * len(p) ** 2 for p in prompts)
    decode_s = (max(outputs) * weight_bytes + kv_read) / (copy_gbps * 1e9)
    prefill_s = prefill_flops / (matmul_tflops * 1e12)
    return {
        "weight_bytes": weight_bytes,
        "kv_bytes_read": kv_read,
        "prefill_flops": prefill_flops,
        "floor_decode_s": decode_s,
        "floor_prefill_s": prefill_s,
        "floor_s": decode_s + prefill_s,
    }


def _timed_generate(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[float, int]:
    """Wall time of one ``generate`` over the whole workload (device work included) and its output tokens."""
    cuda = llm.llm_engine.config.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, sum(len(r.outputs[0].token_ids) for r in results)


def run_config(
    model: str,
    spec: str,
    prompts: list[list[int]],
    outputs: list[int],
    device: str | None,
    dtype: str | None,
    overrides: dict[str, Any],
    repeat: int = 1,
) -> tuple[LLM, dict[str, Any]]:
    """Build the engine of ``spec``, warm it up, then run the workload ``repeat`` times on it.

    The row reports the median run and the spread of all runs; per-step figures
    (batch size, host and forward time) come from the engine's running totals over those runs.
    """
    milestone, extra, limit = parse_config(spec)
    prompts, outputs = prompts[:limit], outputs[:limit]
    llm = LLM(model, milestone=milestone, device=device, dtype=dtype, kv_usage_interval=16, **extra, **overrides)
    engine = llm.llm_engine
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in outputs]
    prompts = [[t % engine.vocab_size for t in p] for p in prompts]  # tiny test vocabularies
    llm.generate([{"prompt_token_ids": [1] * 4}], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    engine.stats = EngineStats()
    preemptions_before = engine.scheduler.num_preemptions
    with watch_compiles() as compiled:
        runs = [_timed_generate(llm, prompts, params) for _ in range(repeat)]
    elapsed = statistics.median(t for t, _ in runs)
    out_tokens = runs[0][1]
    in_tokens = sum(len(p) for p in prompts)
    st = engine.stats
    rates = sorted(n / t for t, n in runs)
    return llm, {
        "config": spec,
        "milestone": milestone,
        "num_prompts": len(prompts),
        "batching": engine.config.scheduler_config.batching,
        "kv_layout": engine.config.cache_config.kv_layout,
        "attention_backend": engine.model_runner.backend_name,
        "num_kv_blocks": engine.kv_cache_manager.num_blocks,
        "block_size": engine.config.cache_config.block_size,
        "repeats": repeat,
        "elapsed_s": elapsed,
        "elapsed_s_runs": [t for t, _ in runs],
        **compiled.record(),  # kernels JIT-compiled inside the measured runs
        "requests_per_s": len(prompts) / elapsed,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / elapsed,
        "output_tokens_per_s_min": rates[0],
        "output_tokens_per_s_max": rates[-1],
        "total_tokens_per_s": (out_tokens + in_tokens) / elapsed,
        "num_steps": st.num_steps // repeat,
        "max_concurrent_seqs": st.max_scheduled_seqs,
        "mean_batch_size": st.num_scheduled_seqs / st.num_steps,
        "num_preemptions": (engine.scheduler.num_preemptions - preemptions_before) // repeat,
        "host_ms_per_step": 1e3 * st.host_time / st.num_steps,
        "forward_ms_per_step": 1e3 * st.forward_time / st.num_steps,
        "kv_utilization_mean": st.kv_utilization_mean,
    }


def run_hf_config(
    model: str, spec: str, prompts: list[list[int]], outputs: list[int], device: str | None, dtype: str | None,
    overrides: dict[str, Any],
) -> tuple[LLM, dict[str, Any]]:  # fmt: skip
    """HF transformers' continuous batching on our weights: every request with its own output length, EOS off.

    The weights come from an M0 engine (no KV cache, so HF's manager sizes its own cache from free
    memory). The manager starts (and on a GPU captures its CUDA graphs) before the clock starts;
    the time runs from the first request added to the last one finished.
    """
    from folovllm.benchmarks.latency import _hf_model

    _, limit = split_prompt_limit(spec)
    prompts, outputs = prompts[:limit], outputs[:limit]
    keep = {k: v for k, v in overrides.items() if k in ("max_model_len", "seed")}
    llm = LLM(model, milestone="M0", device=device, dtype=dtype, **keep)
    hf = _hf_model(llm)
    vocab = llm.llm_engine.vocab_size
    prompts = [[t % vocab for t in p] for p in prompts]
    elapsed, generated = hf_continuous_batching(hf, prompts, outputs, vocab)
    out_tokens = sum(map(len, generated))
    del hf
    return llm, {
        "config": spec,
        "milestone": "HF",
        "engine": "transformers ContinuousBatchingManager",
        "num_prompts": len(prompts),
        "repeats": 1,
        "elapsed_s": elapsed,
        "requests_per_s": len(prompts) / elapsed,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": (out_tokens + sum(map(len, prompts))) / elapsed,
    }


def hf_continuous_batching(hf, prompts: list[list[int]], outputs: list[int], vocab: int) -> tuple[float, list[list[int]]]:
    """Greedy generation of ``outputs[i]`` tokens for each prompt through HF's manager: seconds and tokens.

    EOS is an id the model never samples (``vocab``), so every request runs to its length as ours do.
    """
    from transformers import GenerationConfig

    cuda = hf.device.type == "cuda"
    config = GenerationConfig(do_sample=False, max_new_tokens=max(outputs))
    with hf.continuous_batching_context_manager(generation_config=config, block=True, timeout=5, warmup=cuda) as manager:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        ids = [
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=o, eos_token_id=vocab)
            for i, (p, o) in enumerate(zip(prompts, outputs))
        ]
        done: dict[str, Any] = {}
        while len(done) < len(ids):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                done[result.request_id] = result
            elif result is None and not manager.is_running():
                raise RuntimeError(f"HF's continuous batching stopped with {len(ids) - len(done)} requests unfinished")
        elapsed = time.perf_counter() - start
    failed = [r.error for r in done.values() if r.error is not None]
    if failed:
        raise RuntimeError(f"HF's continuous batching failed {len(failed)} requests: {failed[0]}")
    return elapsed, [list(done[i].generated_tokens) for i in ids]


def bench_throughput(
    model: str,
    configs: list[str],
    num_prompts: int = 256,
    input_len: tuple[int, int] = (100, 1024),
    output_len: tuple[int, int] = (100, 1024),
    seed: int = 0,
    subset: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    out: str | None = None,
    repeat: int = 1,
    **overrides: Any,
) -> dict[str, Any]:
    """Run the workload under each configuration; ``subset`` keeps only the first N prompts.

    A configuration ``SPEC@N`` runs only the first N prompts (sequential runs of the
    full workload would take hours); its floor is computed for those prompts.
    ``repeat`` runs each configuration that many times (median and spread reported).
    With ``out``, the JSON is rewritten after every configuration, so a run cut
    short still keeps what it measured.
    """
    if not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be a positive integer, got {repeat!r}")
    prompts, outputs = random_workload(num_prompts, input_len, output_len, seed)
    if subset is not None:
        prompts, outputs = prompts[:subset], outputs[:subset]
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    meta = provenance(dev, model, dt)
    hardware = {"copy_GBps": measure_copy_bandwidth(dev), "matmul_TFLOPs": measure_matmul_tflops(dev, dt)}
    results: list[dict[str, Any]] = []
    for spec in configs:
        if split_prompt_limit(spec)[0] == "HF":
            llm, row = run_hf_config(model, spec, prompts, outputs, device, dtype, overrides)
        else:
            llm, row = run_config(model, spec, prompts, outputs, device, dtype, overrides, repeat)
        n = row["num_prompts"]
        row["floor"] = workload_floor(llm, prompts[:n], outputs[:n], hardware["copy_GBps"], hardware["matmul_TFLOPs"])
        row["fraction_of_floor"] = row["floor"]["floor_s"] / row["elapsed_s"]
        results.append(row)
        print(f"[{spec}] {row['output_tokens_per_s']:.0f} output tok/s in {row['elapsed_s']:.1f} s", file=sys.stderr)
        if out:
            save_json(
                out, _payload(meta, prompts, outputs, input_len, output_len, seed, subset, overrides, hardware, results)
            )
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return _payload(meta, prompts, outputs, input_len, output_len, seed, subset, overrides, hardware, results)


def _payload(
    meta: dict,
    prompts: list[list[int]],
    outputs: list[int],
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    seed: int,
    subset: int | None,
    overrides: dict,
    hardware: dict,
    results: list[dict],
) -> dict[str, Any]:
    base = results[0]["output_tokens_per_s"]
    for row in results:
        row["speedup_vs_first"] = row["output_tokens_per_s"] / base
    return {
        "benchmark": "throughput",
        **meta,
        "workload": {
            "num_prompts": len(prompts),
            "input_len": list(input_len),
            "output_len": list(output_len),
            "seed": seed,
            "subset": subset,
            "prompt_tokens": sum(map(len, prompts)),
            "output_tokens": sum(outputs),
            "overrides": overrides,
        },
        "hardware": hardware,
        "results": results,
    }
