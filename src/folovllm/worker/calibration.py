"""Timing designed steps before serving: the open-loop calibration of the scheduler's cost model (M5).

Each designed step (per request: new tokens, context length after them) runs through the
runner's own path (``execute_model``: graph selection, padding, sampling), so it costs what
a served step of that shape costs. Its requests are made up: they write KV into blocks no
request holds yet (calibration runs before the first request) and are forgotten afterwards.
"""

from __future__ import annotations

import statistics
import time

from folovllm.core.sched.cost_model import Shape
from folovllm.core.sched.output import ScheduledRequest, SchedulerOutput
from folovllm.sampling_params import SamplingParams
from folovllm.utils import cdiv
from folovllm.worker.model_runner import ModelRunner


def _designed_step(shapes: list[Shape], index: int, block_size: int, num_blocks: int) -> SchedulerOutput:
    """The step as the scheduler would hand it over; requests take distinct blocks while the cache has
    them (so context reads come from memory, not from a cache line another request just pulled in)."""
    params = SamplingParams(temperature=0.0, max_tokens=1)
    scheduled, next_block = [], 0
    for j, (num_new, seq_len) in enumerate(shapes):
        blocks = [(next_block + b) % max(num_blocks, 1) for b in range(cdiv(seq_len, block_size))]
        next_block += len(blocks)
        start = seq_len - num_new
        scheduled.append(
            ScheduledRequest(
                req_id=f"calibration-{index}-{j}", token_ids=[0] * num_new, num_tokens=num_new, start_pos=start,
                num_prompt_tokens=seq_len if num_new > 1 else start, block_offset=0, new_block_ids=blocks,
                sampling_params=params, sample=True,
            )
        )  # fmt: skip
    return SchedulerOutput(scheduled=scheduled)


def time_designed_steps(
    runner: ModelRunner, families: list[list[list[Shape]]], limit: float, repeats: int = 3
) -> tuple[list[list[Shape]], list[float]]:
    """The steps run and their seconds (the device's clock on a GPU; the median of ``repeats``, after a run
    not counted, since a first run may compile). Each family runs from its smallest step and stops after the
    first that takes more than ``limit`` seconds (its first two always run): serving will not need larger
    ones priced exactly, and on a CPU they could cost minutes."""
    num_blocks = runner.kv_caches[0].shape[1] if runner.kv_caches else 0
    steps, seconds, finished = [], [], []
    for family in families:
        for k, shapes in enumerate(family):
            sched = _designed_step(shapes, len(steps), runner.block_size, num_blocks)
            times = []
            for _ in range(repeats + 1):
                sched.finished_req_ids = finished  # the previous step's made-up requests leave the block table
                t0 = time.perf_counter()
                out = runner.execute_model(sched)
                times.append(out.device_time if out.device_time is not None else time.perf_counter() - t0)
                finished = []
            steps.append(shapes)
            seconds.append(statistics.median(times[1:]))
            finished = [s.req_id for s in sched.scheduled]
            if k >= 1 and seconds[-1] > limit:
                break
    runner.execute_model(SchedulerOutput(finished_req_ids=finished))
    runner.reset_step_timing()
    return steps, seconds
