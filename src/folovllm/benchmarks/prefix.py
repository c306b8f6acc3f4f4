"""``folovllm bench prefix``: what prefix caching saves, for several engine configs in one run.

Three workloads, each run on every config (e.g. ``M4`` without the cache, ``M6`` with it):

* ``ttft``: one request of a long prefix + a short suffix arrives alone (a miss),
  then the same prefix with another suffix (a hit); time to first token of each.
* ``throughput``: many requests share one long system prompt, each with its own
  short question; all arrive at once. Output tokens/s, peak KV blocks in use.
* ``chat``: conversations where each turn resends the whole conversation so far
  (system prompt, earlier questions and the model's own answers); per turn the
  TTFT and the fraction of prompt tokens served from the cache.

Prompts are random token ids (``random:`` models have no tokenizer); the cache
only compares ids, so the hit pattern is that of real text.
"""

from __future__ import annotations

import gc
import itertools
import random
import statistics
import sys
import time
from typing import Any

import torch

from folovllm.benchmarks.common import parse_config, provenance, save_json
from folovllm.benchmarks.step_profile import record_profile
from folovllm.config import resolve_device, resolve_dtype
from folovllm.engine.llm_engine import EngineStats
from folovllm.entrypoints.llm import LLM
from folovllm.outputs import RequestOutput
from folovllm.sampling_params import RequestOutputKind, SamplingParams

_ids = itertools.count()


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def _sync(llm: LLM) -> None:
    if llm.llm_engine.config.device.type == "cuda":
        torch.cuda.synchronize()


def run_batch(llm: LLM, prompts: list[list[int]], max_tokens: list[int]) -> tuple[list[RequestOutput], float, int]:
    """All prompts at once, greedy, no EOS stop: outputs in order, wall time, peak KV blocks in use.

    Blocks in use are those some request holds (ref count > 0); cached blocks nobody
    holds are free memory that happens to remember a prefix.
    """
    engine = llm.llm_engine
    pool = getattr(engine.kv_cache_manager, "block_pool", None)
    ids = [f"p{next(_ids)}" for _ in prompts]
    _sync(llm)
    start = time.perf_counter()
    for rid, prompt, n in zip(ids, prompts, max_tokens):
        engine.add_request(
            rid,
            {"prompt_token_ids": prompt},
            SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY),
        )
    done: dict[str, RequestOutput] = {}
    peak = 0
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
        if pool is not None:
            peak = max(peak, pool.num_blocks - pool.num_free_blocks)
    _sync(llm)
    return [done[rid] for rid in ids], time.perf_counter() - start, peak


def _ttft(llm: LLM, rng: random.Random, vocab: int, prefix_len: int, suffix_len: int, repeat: int) -> dict[str, Any]:
    """``repeat`` fresh prefixes: each first alone with one suffix (miss), then with another (hit).

    One more pair runs first and is dropped: Triton compiles kernels for new shapes on first use.
    """
    rows = []
    for _ in range(repeat + 1):
        prefix = _tokens(rng, prefix_len, vocab)
        (miss,), _, _ = run_batch(llm, [prefix + _tokens(rng, suffix_len, vocab)], [1])
        (hit,), _, _ = run_batch(llm, [prefix + _tokens(rng, suffix_len, vocab)], [1])
        rows.append(
            {
                "miss_ttft_s": miss.metrics.ttft,
                "hit_ttft_s": hit.metrics.ttft,
                "hit_num_cached_tokens": hit.num_cached_tokens,
            }
        )
    rows = rows[1:]
    profile = _profile_hit(llm, rng, vocab, prefix_len, suffix_len)
    miss_s = statistics.median(r["miss_ttft_s"] for r in rows)
    hit_s = statistics.median(r["hit_ttft_s"] for r in rows)
    return {
        "prefix_len": prefix_len,
        "suffix_len": suffix_len,
        "miss_ttft_s": miss_s,
        "hit_ttft_s": hit_s,
        "speedup": miss_s / hit_s,
        "runs": rows,
        "hit_profile": profile,
    }


def _profile_hit(llm: LLM, rng: random.Random, vocab: int, prefix_len: int, suffix_len: int) -> dict[str, Any]:
    """One more hit, recorded with ``torch.profiler`` (after its miss, unrecorded): where its TTFT goes,
    GPU kernels against host time (the engine's own host/forward split of the steps it took)."""
    engine = llm.llm_engine
    prefix = _tokens(rng, prefix_len, vocab)
    run_batch(llm, [prefix + _tokens(rng, suffix_len, vocab)], [1])
    engine.stats = EngineStats()
    prompt = prefix + _tokens(rng, suffix_len, vocab)
    row = record_profile(lambda: run_batch(llm, [prompt], [1]), engine.config.device, timeline=False)
    st = engine.stats
    return {**row, "steps": st.num_steps, "host_ms": st.host_time * 1e3, "forward_ms": st.forward_time * 1e3}


def _throughput(
    llm: LLM, rng: random.Random, vocab: int, num_prompts: int, system_len: int, user_len: tuple[int, int], output_len: int
) -> dict[str, Any]:
    system = _tokens(rng, system_len, vocab)
    prompts = [system + _tokens(rng, rng.randint(*user_len), vocab) for _ in range(num_prompts)]
    before = llm.llm_engine.prefix_cache_stats
    outs, elapsed, peak = run_batch(llm, prompts, [output_len] * num_prompts)
    stats = llm.llm_engine.prefix_cache_stats.since(before)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "num_prompts": num_prompts,
        "system_len": system_len,
        "user_len": list(user_len),
        "output_len": output_len,
        "prompt_tokens": sum(map(len, prompts)),
        "elapsed_s": elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "requests_per_s": num_prompts / elapsed,
        "mean_ttft_s": statistics.mean(o.metrics.ttft for o in outs),
        "cached_tokens": sum(o.num_cached_tokens or 0 for o in outs),
        "hit_rate": stats.hit_rate,
        "evictions": stats.evictions,
        "peak_kv_blocks_used": peak,
    }


def _chat(
    llm: LLM, rng: random.Random, vocab: int, conversations: int, turns: int, system_len: int, turn_len: int, reply_len: int
) -> list[dict[str, Any]]:
    """Every conversation's next turn arrives together; its prompt is the whole conversation so far."""
    system = _tokens(rng, system_len, vocab)
    history = [list(system) for _ in range(conversations)]
    rows = []
    for turn in range(turns):
        for h in history:
            h += _tokens(rng, turn_len, vocab)
        before = llm.llm_engine.prefix_cache_stats
        outs, elapsed, _ = run_batch(llm, [list(h) for h in history], [reply_len] * conversations)
        stats = llm.llm_engine.prefix_cache_stats.since(before)
        for h, o in zip(history, outs):
            h += o.outputs[0].token_ids
        rows.append(
            {
                "turn": turn + 1,
                "prompt_len": len(outs[0].prompt_token_ids),
                "elapsed_s": elapsed,
                "mean_ttft_s": statistics.mean(o.metrics.ttft for o in outs),
                "hit_rate": stats.hit_rate,
                "cached_tokens": sum(o.num_cached_tokens or 0 for o in outs),
                "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs),
            }
        )
    return rows


PARTS = ("ttft", "throughput", "chat")


def bench_prefix(
    model: str,
    configs: list[str],
    parts: tuple[str, ...] = PARTS,
    prefix_len: int = 4096,
    suffix_len: int = 128,
    repeat: int = 3,
    num_prompts: int = 256,
    system_len: int = 2048,
    user_len: tuple[int, int] = (32, 128),
    output_len: int = 128,
    conversations: int = 16,
    turns: int = 6,
    chat_system_len: int = 512,
    turn_len: int = 64,
    reply_len: int = 64,
    seed: int = 0,
    device: str | None = None,
    dtype: str | None = None,
    out: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Each config (``M4``, ``M6``, ``M6/sync``...) runs the chosen parts on one engine, its cache
    reset between parts. With ``out`` the JSON is rewritten after every config."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"parts must be among {PARTS}, got {unknown}")
    for name, value in (
        ("prefix_len", prefix_len),
        ("suffix_len", suffix_len),
        ("repeat", repeat),
        ("num_prompts", num_prompts),
        ("system_len", system_len),
        ("output_len", output_len),
        ("conversations", conversations),
        ("turns", turns),
        ("turn_len", turn_len),
        ("reply_len", reply_len),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    need = max(
        24,
        prefix_len + suffix_len + 1,
        system_len + user_len[1] + output_len,
        chat_system_len + turns * (turn_len + reply_len),
    )
    overrides.setdefault("max_model_len", need)
    dev = resolve_device(device)
    meta = provenance(dev, model, resolve_dtype(dtype, dev))
    workload = {
        "parts": list(parts),
        "prefix_len": prefix_len,
        "suffix_len": suffix_len,
        "repeat": repeat,
        "num_prompts": num_prompts,
        "system_len": system_len,
        "user_len": list(user_len),
        "output_len": output_len,
        "conversations": conversations,
        "turns": turns,
        "chat_system_len": chat_system_len,
        "turn_len": turn_len,
        "reply_len": reply_len,
        "seed": seed,
        "overrides": overrides,
    }
    results: list[dict[str, Any]] = []
    for spec in configs:
        milestone, extra, _ = parse_config(spec)
        llm = LLM(model, milestone=milestone, device=device, dtype=dtype, seed=seed, **extra, **overrides)
        engine = llm.llm_engine
        vocab = min(engine.vocab_size, 10000)
        rng = random.Random(seed)  # every config sees the same prompts
        warm = _tokens(rng, 16, vocab)
        run_batch(llm, [warm + [1] * 4], [2])  # compile the kernels of a miss, then of a hit
        run_batch(llm, [warm + [2] * 4], [2])
        row: dict[str, Any] = {
            "config": spec,
            "milestone": milestone,
            "prefix_caching": engine.config.cache_config.enable_prefix_caching,
            "attention_backend": engine.model_runner.backend_name,
            "num_kv_blocks": engine.kv_cache_manager.num_blocks,
            "block_size": engine.config.cache_config.block_size,
            "kv_bytes_per_token": engine.model_runner.kv_bytes_per_token(),
        }
        for part in parts:
            llm.reset_prefix_cache()
            if part == "ttft":
                row["ttft"] = _ttft(llm, rng, vocab, prefix_len, suffix_len, repeat)
            elif part == "throughput":
                row["throughput"] = _throughput(llm, rng, vocab, num_prompts, system_len, user_len, output_len)
            else:
                row["chat"] = _chat(llm, rng, vocab, conversations, turns, chat_system_len, turn_len, reply_len)
            print(f"[{spec}] {part} done", file=sys.stderr)
        results.append(row)
        if out:
            save_json(out, _payload(meta, workload, results))
        del llm, engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return _payload(meta, workload, results)


def _payload(meta: dict, workload: dict, results: list[dict]) -> dict[str, Any]:
    """Results plus the headline ratios of the last config (the cached one) over the first."""
    summary: dict[str, Any] = {}
    first, last = results[0], results[-1]
    if "ttft" in last:
        summary["ttft_hit_speedup"] = last["ttft"]["speedup"]
    if "throughput" in first and "throughput" in last:
        a, b = first["throughput"], last["throughput"]
        summary["throughput_speedup"] = b["output_tokens_per_s"] / a["output_tokens_per_s"]
        summary["kv_blocks_saved_at_peak"] = a["peak_kv_blocks_used"] - b["peak_kv_blocks_used"]
        summary["kv_gib_saved_at_peak"] = (
            summary["kv_blocks_saved_at_peak"] * last["block_size"] * last["kv_bytes_per_token"] / 2**30
        )
    if "chat" in last:
        summary["chat_hit_rate_per_turn"] = [r["hit_rate"] for r in last["chat"]]
    return {"benchmark": "prefix", **meta, "workload": workload, "summary": summary, "results": results}
