"""#15, twentieth session: does capturing M5's mixed-step graphs slow down a decode graph captured before them?

``m7_gaps.py`` showed an engine's decode graph replaying with 0.5 µs gaps instead of 0.1 µs after mixed-step graphs
were captured in the process (in that engine or an earlier one), even with the decode ladder captured first. Here
one engine with M5's graph mode captures its decode ladder first and the replay of its one-sequence decode graph is
timed right after that capture, again after the mixed-step graphs are captured, and once more when the engine is
ready. Writes one JSON.

    python3 milestones/results/gap_capture_probe.py OUT.json
"""

from __future__ import annotations

import json
import sys
import time
from unittest import mock

import torch

from folovllm import LLM
from folovllm.benchmarks.common import provenance
from folovllm.worker import model_runner
from folovllm.worker.cuda_graph import CUDAGraphRunner

MODEL, REPLAYS = "random:qwen3-8b", 100


def replay_ms(runner: CUDAGraphRunner) -> float:
    size = runner.sizes[0]
    runner.replay(size)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(REPLAYS):
        runner.replay(size)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / REPLAYS


def main(out: str) -> None:
    times: dict[str, float] = {}
    capture = model_runner.capture_in_one_pool

    def decode_first(runners: list[CUDAGraphRunner], largest_only: bool = False) -> None:
        if largest_only or len(runners) < 2:  # the memory probe, or no mixed-step graphs
            return capture(runners, largest_only)
        decode, mixed = runners[-1], runners[0]
        decode.capture()
        times["after_decode_capture"] = replay_ms(decode)
        mixed.capture(None, decode.pool)
        times["after_mixed_capture"] = replay_ms(decode)

    with mock.patch.object(model_runner, "capture_in_one_pool", decode_first):
        llm = LLM(MODEL, milestone="M4", cudagraph_mode="FULL", max_num_seqs=1, max_model_len=512, kv_cache_memory=2**30)
    times["engine_ready"] = replay_ms(llm.llm_engine.model_runner.cuda_graphs)
    result = {"probe": "gap_capture_probe", **provenance(torch.device("cuda"), MODEL, torch.bfloat16),
              "replays": REPLAYS, "decode_graph_replay_ms": times}  # fmt: skip
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(times)


if __name__ == "__main__":
    main(sys.argv[-1])
