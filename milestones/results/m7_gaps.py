"""#15: where a batch-1 decode step leaves the GPU idle, kernel by kernel (the ``M7-step`` profile's 0.17 ms).

For bf16 (M4, and M6 with M5's graph mode), GPTQ (M7/gptq, and with M4's graph mode) and GPTQ with every
Gluon launch replaced by its Triton twin (``M7/gptq-triton``, ``gptq_gemm.ws_supported`` patched to refuse) on
``random:qwen3-8b``: decode steps under ``torch.profiler``, every GPU event
in start order, and each event's gap (its start minus the latest end before it) charged to the event that
follows the gap, summed by name: a gap before a kernel is the launch latency inside a CUDA graph (or a host
wait, at a step's first kernel). Writes one JSON: per config the busy and idle time per step and, per kernel
name, its count, time and the idle time before it.

    python3 milestones/results/m7_gaps.py OUT.json
    python3 milestones/results/m7_gaps.py --switches OUT.json
    python3 milestones/results/m7_gaps.py --switches --reverse OUT.json
    python3 milestones/results/m7_gaps.py --sequence M4,M4+full-graphs,M4 OUT.json

``--switches`` runs bf16 only, M4 with each of M5's and M6's changes alone (chunked prefill with M5's budget, M5's
graph mode, prefix caching), then M5 and M6: which change brings the gaps. ``--reverse`` runs the same list last
to first and profiles each engine twice, and records the device memory still allocated before each engine is
built: whether the gaps follow the config, the order of engines in one process, or the profiler's session.
``--sequence`` runs the switch configs named, in that order, repeats allowed. Each config also records the wall time
of 40 decode steps run just before, without the profiler, and the CUDA graphs still alive when it is built.
``--decode-first`` captures the decode ladder before the mixed-step graphs (the engine captures mixed steps first).
"""

from __future__ import annotations

import gc
import json
import sys
import time
from contextlib import nullcontext
from unittest import mock

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from folovllm import LLM, SamplingParams
from folovllm.benchmarks.common import provenance
from folovllm.model_executor.layers.quantization.ops import gptq_gemm
from folovllm.worker import model_runner

MODEL, PROMPT_LEN, STEPS, UNPROFILED = "random:qwen3-8b", 128, 5, 40


def timed_decode_steps(engine, request_id: str, max_tokens: int, warm_steps: int, steps: int) -> float:
    """Add a seeded ``PROMPT_LEN``-token request, run ``warm_steps`` engine steps (its prefill, then decodes), then
    return the wall time per step of the next ``steps``, unprofiled; the request is left running."""
    prompt = torch.randint(0, 10000, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0)).tolist()
    engine.add_request(request_id, {"prompt_token_ids": prompt}, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    for _ in range(warm_steps):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / steps


def kernels_after_previous(prof: profile) -> list[tuple[object, float | None]]:
    """The profiled CUDA kernels in start order, each with its start minus the latest end before it (µs; negative: it
    started while a kernel before still ran; None for the first)."""
    events = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    out, end = [], None
    for e in events:
        out.append((e, None if end is None else e.time_range.start - end))
        end = e.time_range.end if end is None else max(end, e.time_range.end)
    return out


def gaps(llm: LLM) -> dict:
    engine = llm.llm_engine
    # the same steps unprofiled first: what the profiler's view costs in wall time
    wall_ms = timed_decode_steps(engine, "gaps", max_tokens=128, warm_steps=8, steps=UNPROFILED)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            engine.step()
        torch.cuda.synchronize()
    engine.abort_request(["gaps"])
    kernels = kernels_after_previous(prof)
    by_name: dict[str, dict] = {}
    idle = []
    for e, after in kernels:
        gap = max(0.0, after or 0.0)
        entry = by_name.setdefault(e.name[:60], {"count": 0, "busy_us": 0.0, "idle_before_us": 0.0})
        entry["count"] += 1
        entry["busy_us"] += e.time_range.elapsed_us()
        entry["idle_before_us"] += gap
        idle.append((gap, e.name[:60]))
    end = max(e.time_range.end for e, _ in kernels)
    span = (end - kernels[0][0].time_range.start) / STEPS
    total_idle = sum(g for g, _ in idle) / STEPS
    per_step = {n: {k: (v / STEPS if k != "count" else v // STEPS) for k, v in d.items()} for n, d in by_name.items()}
    return {
        "unprofiled_ms_per_step": wall_ms,
        "span_us_per_step": span,
        "idle_us_per_step": total_idle,
        "kernels_per_step": len(kernels) / STEPS,
        "by_name": dict(sorted(per_step.items(), key=lambda kv: -kv[1]["idle_before_us"])),
        "largest_gaps_us": [[round(g, 2), n] for g, n in sorted(idle, reverse=True)[:12]],
    }


def main(
    out: str, switches: bool = False, reverse: bool = False, sequence: list[str] | None = None, decode_first: bool = False
) -> None:
    result = {"probe": "m7_gaps", **provenance(torch.device("cuda"), MODEL, torch.bfloat16), "steps": STEPS,
              "prompt_len": PROMPT_LEN, "configs": {}}  # fmt: skip
    m4, gptq = {"milestone": "M4"}, {"milestone": "M7", "quantization": "gptq"}
    switch_configs = {
        "M4": m4, "M4+chunked": m4 | {"enable_chunked_prefill": True, "max_num_batched_tokens": 512},
        "M4+full-graphs": m4 | {"cudagraph_mode": "FULL"}, "M4+prefix": m4 | {"enable_prefix_caching": True},
        "M5": {"milestone": "M5"}, "M6": {"milestone": "M6"},
        # M5's graph mode with a 16-token budget: one mixed-step graph instead of the whole ladder
        "M4+full-graphs-16": m4 | {"cudagraph_mode": "FULL", "enable_chunked_prefill": True, "max_num_batched_tokens": 16},
    }  # fmt: skip
    if sequence:  # switch configs by label, in this order, repeats allowed (labelled by position)
        configs = tuple((f"{i}:{label}", switch_configs[label]) for i, label in enumerate(sequence, 1))
    elif switches:
        configs = tuple(switch_configs.items())[:6]
        configs = configs[::-1] if reverse else configs
    else:
        decode_graphs = {"cudagraph_mode": "FULL_DECODE_ONLY"}  # M4's graphs (M5 on capture mixed steps too)
        configs = (("M4", m4), ("M6", {"milestone": "M6"}), ("M7/gptq", gptq),
                   ("M7/gptq/decode-graphs", gptq | decode_graphs), ("M7/gptq-triton", gptq))  # fmt: skip
    capture = model_runner.capture_in_one_pool
    order = mock.patch.object(model_runner, "capture_in_one_pool", lambda runners, *a, **k: capture(runners[::-1], *a, **k))
    for label, kwargs in configs:
        twin = mock.patch.object(gptq_gemm, "ws_supported", lambda *args: False)
        with twin if label.endswith("triton") else nullcontext(), order if decode_first else nullcontext():
            allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
            alive = sum(isinstance(o, torch.cuda.CUDAGraph) for o in gc.get_objects())  # graphs of engines before
            llm = LLM(MODEL, max_num_seqs=1, max_model_len=512, kv_cache_memory=2**30, **kwargs)
            result["configs"][label] = gaps(llm) | {
                "allocated_before_GiB": allocated / 2**30,
                "graphs_alive_before": alive,
                "reserved_before_GiB": reserved / 2**30,
            }
            if reverse:  # the same engine under a second profiler session
                result["configs"][label + "#2"] = gaps(llm)
        del llm
        gc.collect()  # the engine holds the weights and the KV cache until collected
        torch.cuda.empty_cache()
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    for label, r in result["configs"].items():
        top = [(n, round(d["idle_before_us"], 1), d["count"]) for n, d in list(r["by_name"].items())[:6]]
        print(label, round(r["span_us_per_step"], 1), round(r["idle_us_per_step"], 1), top)


if __name__ == "__main__":
    flags = sys.argv[1:-1]
    sequence = flags[flags.index("--sequence") + 1].split(",") if "--sequence" in flags else None
    main(sys.argv[-1], switches="--switches" in flags or sequence is not None, reverse="--reverse" in flags,
         sequence=sequence, decode_first="--decode-first" in flags)  # fmt: skip
