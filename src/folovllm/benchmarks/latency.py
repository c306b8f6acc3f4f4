"""``folovllm bench latency``: TTFT and TPOT of our engine vs HF ``generate``, same run.

Decode is memory-bound: each step must read every weight once, so
``weight_bytes / copy_bandwidth`` is the floor of one decode step.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from folovllm.benchmarks.common import parse_config, provenance
from folovllm.benchmarks.hardware import measure_copy_bandwidth
from folovllm.entrypoints.llm import LLM
from folovllm.sampling_params import SamplingParams


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ours(llm: LLM, prompts: list[list[int]], output_len: int) -> dict[str, float]:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    device = llm.llm_engine.config.device
    _sync(device)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    _sync(device)
    elapsed = time.perf_counter() - start
    tpots = [o.metrics.tpot for o in outs if o.metrics.tpot is not None]
    return {
        "ttft_s": statistics.mean(o.metrics.ttft for o in outs),
        "tpot_s": statistics.mean(tpots) if tpots else None,
        "e2e_s": elapsed,
        "output_tokens_per_s": len(prompts) * output_len / elapsed,
        "num_cached_tokens": sum(o.num_cached_tokens or 0 for o in outs),
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each timing's median over the runs, plus every run's TTFT and TPOT."""
    row = dict(runs[-1])
    for key in ("ttft_s", "tpot_s", "e2e_s", "output_tokens_per_s"):
        values = [r[key] for r in runs if r[key] is not None]
        row[key] = statistics.median(values) if values else None
    row["ttft_s_runs"] = [r["ttft_s"] for r in runs]
    row["tpot_s_runs"] = [r["tpot_s"] for r in runs]
    return row


def _hf_model(llm: LLM):
    """HF transformers' model at the same shapes, dtype and device, holding our weights."""
    from transformers import AutoModelForCausalLM

    engine = llm.llm_engine
    cfg = engine.config.model_config
    with torch.device(cfg.device):
        model = AutoModelForCausalLM.from_config(engine.hf_config, dtype=cfg.dtype)
    model.load_state_dict(hf_state_dict(engine.model_runner.model), strict=False)
    return model.eval()


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our weights under HF's names: merged qkv / gate_up split back through the model's own layout."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    state = {}
    for hf_name, (name, shard) in model.checkpoint_layout().items():
        tensor = params[name]
        state[hf_name] = tensor if shard is None else tensor[modules[name.rpartition(".")[0]].shard_rows(shard)]
    if getattr(model, "tie_word_embeddings", False):
        state["lm_head.weight"] = params["model.embed_tokens.weight"]
    return state


class _TokenTimes:
    """An HF ``generate`` streamer that stamps each new token's arrival (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


@torch.inference_mode()
def _hf(model, prompts: list[list[int]], output_len: int, device: torch.device, repeats: int = 1) -> dict[str, Any]:
    """HF generate (greedy, no EOS stop); TTFT and TPOT from per-token stamps of one run, TTFT the
    median of ``repeats`` (the others generate one token each: a whole run takes seconds)."""
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)

    def run(n: int) -> tuple[float, list[float]]:
        stamps = _TokenTimes()
        _sync(device)
        start = time.perf_counter()
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            streamer=stamps,
        )
        _sync(device)
        return start, stamps.times

    run(2)
    start, times = run(output_len)
    total = times[-1] - start
    ttfts = [times[0] - start]
    for _ in range(repeats - 1):
        first, stamps = run(1)
        ttfts.append(stamps[0] - first)
    return {
        "ttft_s": statistics.median(ttfts),
        "ttft_s_runs": ttfts,
        "tpot_s": (times[-1] - times[0]) / max(output_len - 1, 1),
        "e2e_s": total,
        "output_tokens_per_s": len(prompts) * output_len / total,
    }


def bench_latency(
    model: str,
    input_lens: list[int],
    output_len: int,
    batch_size: int = 1,
    device: str | None = None,
    dtype: str | None = None,
    milestone: str | None = None,
    with_hf: bool = True,
    seed: int = 0,
    repeats: int = 1,
    **overrides: Any,
) -> dict[str, Any]:
    """One row per prompt length: our TTFT/TPOT, HF's, and the decode floor.

    ``repeats`` > 1 times each engine that many times and reports medians, with every run's
    TTFT and TPOT beside them: one prefill is a few milliseconds and varies by several percent.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    gen = torch.Generator().manual_seed(seed)
    as_of, variant, _ = parse_config(milestone) if milestone else (None, {}, None)
    overrides = {**variant, **overrides}
    llm = LLM(
        model,
        milestone=as_of,
        device=device,
        dtype=dtype,
        seed=seed,
        max_model_len=overrides.pop("max_model_len", max(input_lens) + output_len),
        **overrides,
    )
    engine = llm.llm_engine
    dev, dt = engine.config.device, engine.config.model_config.dtype
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model_runner.model.parameters())
    copy_gbps = measure_copy_bandwidth(dev)
    floor = weight_bytes / (copy_gbps * 1e9)
    hf_model = _hf_model(llm) if with_hf else None
    rows = []
    for input_len in input_lens:
        prompts = torch.randint(0, min(engine.vocab_size, 10000), (batch_size, input_len), generator=gen).tolist()
        _ours(llm, prompts, min(output_len, 4))  # warm-up
        runs = []
        for _ in range(repeats):
            llm.reset_prefix_cache()  # else (M6+) the prompt would hit the previous run's blocks: TTFT of a real prefill
            runs.append(_ours(llm, prompts, output_len))
        ours = _median_run(runs)
        row: dict[str, Any] = {
            "input_len": input_len,
            "output_len": output_len,
            "batch_size": batch_size,
            "folovllm": {**ours, "tpot_vs_floor": ours["tpot_s"] / floor if ours["tpot_s"] else None},
        }
        if hf_model is not None:
            hf = _hf(hf_model, prompts, output_len, dev, repeats)
            row["hf_transformers"] = {**hf, "tpot_vs_floor": hf["tpot_s"] / floor}
            row["speedup_tpot_vs_hf"] = hf["tpot_s"] / ours["tpot_s"] if ours["tpot_s"] else None
        rows.append(row)
    return {
        "benchmark": "latency",
        **provenance(dev, model, dt),
        "milestone": milestone or "latest",
        "workload": {"input_lens": input_lens, "output_len": output_len, "batch_size": batch_size, "repeats": repeats},
        "weight_bytes": weight_bytes,
        "copy_GBps": copy_gbps,
        "decode_floor_s": floor,
        "results": rows,
    }
