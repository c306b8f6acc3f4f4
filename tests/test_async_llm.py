"""``AsyncLLM``: the same tokens as the offline engine, concurrent callers, aborts that free blocks at once,
failures that stay with their requests, shutdown with and without draining."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace

import pytest

from folovllm import LLM, SamplingParams
from folovllm.engine.async_llm import AsyncLLM, EngineDeadError, RequestAbortedError
from folovllm.sampling_params import RequestOutputKind

MODEL = dict(model="random:tiny-llama", max_model_len=128, kv_cache_memory=2**20, device="cpu")
PROMPTS = [{"prompt_token_ids": [(7 * i + 3 * j) % 500 + 3 for j in range(5 + 3 * i)]} for i in range(8)]


def _engine(**kw) -> AsyncLLM:
    return AsyncLLM.from_milestone(**{**MODEL, **kw})


@pytest.fixture(scope="module")
def llm():
    engine = _engine()
    yield engine
    engine.shutdown(drain=False)


async def _collect(llm: AsyncLLM, prompt, params, rid: str, kind: RequestOutputKind, pause: float = 0.0):
    """Token ids per completion index, and how many outputs arrived."""
    tokens: dict[int, list[int]] = {}
    count = 0
    async for out in llm.generate(prompt, replace(params, output_kind=kind), rid):
        count += 1
        for c in out.outputs:
            if kind is RequestOutputKind.DELTA:
                tokens.setdefault(c.index, []).extend(c.token_ids)
            else:
                tokens[c.index] = c.token_ids
        await asyncio.sleep(pause)
    return tokens, count


def test_concurrent_callers_get_the_offline_engines_tokens(llm):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(**MODEL).generate(PROMPTS, params, use_tqdm=False)]

    async def main():
        kinds = [RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE]
        return await asyncio.gather(
            *[_collect(llm, p, params, f"c{i}", kinds[i % 2], pause=0.02 * (i == 3)) for i, p in enumerate(PROMPTS)]
        )

    results = asyncio.run(main())
    assert [r[0][0] for r in results] == expected
    assert results[3][1] < 12  # a slow reader finds several tokens per read: nothing lost, nothing queued up


def test_n_and_seed_in_delta_mode_match_cumulative(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    delta, _ = asyncio.run(_collect(llm, PROMPTS[2], params, "d", RequestOutputKind.DELTA))
    cumulative, _ = asyncio.run(_collect(llm, PROMPTS[2], params, "c", RequestOutputKind.CUMULATIVE))
    assert delta == cumulative and sorted(delta) == [0, 1, 2] and all(len(t) == 10 for t in delta.values())
    final, count = asyncio.run(_collect(llm, PROMPTS[2], params, "f", RequestOutputKind.FINAL_ONLY))
    assert final == cumulative and count == 1


def test_bad_input_raises_to_its_caller_and_the_loop_goes_on(llm):
    async def main():
        with pytest.raises(ValueError, match="prompt has 200 tokens; max_model_len is 128"):
            await llm.add_request("long", {"prompt_token_ids": [5] * 200}, SamplingParams())
        first = asyncio.ensure_future(
            _collect(llm, PROMPTS[0], SamplingParams(max_tokens=30, ignore_eos=True), "dup", RequestOutputKind.DELTA)
        )
        await asyncio.sleep(0.01)
        with pytest.raises(ValueError, match="request_id 'dup' is already in use"):
            await llm.add_request("dup", PROMPTS[1], SamplingParams())
        return await first

    tokens, _ = asyncio.run(main())
    assert len(tokens[0]) == 30


def test_leaving_early_aborts_and_frees_every_block(llm):
    async def main():
        params = SamplingParams(max_tokens=100, ignore_eos=True)
        seen = 0
        async with contextlib.aclosing(llm.generate(PROMPTS[5], params, "leaver")) as gen:
            async for out in gen:
                seen += len(out.outputs[0].token_ids)
                if seen >= 3:
                    load_during = await llm.get_load()
                    break
        return load_during, await llm.get_load()

    during, after = asyncio.run(main())
    assert during.num_running == 1 and during.num_used_kv_blocks > 0
    assert (after.num_running, after.num_waiting, after.num_used_kv_blocks) == (0, 0, 0)
    deadline = time.monotonic() + 5  # with async scheduling, one launched step is still to be collected
    while llm.engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not llm.engine.has_unfinished_requests()


def test_cancelled_task_and_outside_abort(llm):
    async def main():
        params = SamplingParams(max_tokens=100, ignore_eos=True)
        task = asyncio.ensure_future(_collect(llm, PROMPTS[1], params, "cancelled", RequestOutputKind.DELTA))
        await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        reader = asyncio.ensure_future(_collect(llm, PROMPTS[2], params, "aborted", RequestOutputKind.DELTA))
        await asyncio.sleep(0.02)
        await llm.abort("aborted")
        with pytest.raises(RequestAbortedError, match="request 'aborted' was aborted"):
            await reader
        return await llm.get_load()

    load = asyncio.run(main())
    assert (load.num_running, load.num_used_kv_blocks) == (0, 0)


def test_a_failing_step_fails_its_requests_not_the_loop():
    llm = _engine()
    real_step, calls = llm.engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real_step()

    llm.engine.step = flaky_step
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            asyncio.run(_collect(llm, PROMPTS[0], params, "a", RequestOutputKind.DELTA))
        tokens, _ = asyncio.run(_collect(llm, PROMPTS[0], params, "b", RequestOutputKind.DELTA))
        assert len(tokens[0]) == 8 and llm.is_running
        assert asyncio.run(llm.get_load()).num_used_kv_blocks == 0
    finally:
        llm.shutdown(drain=False)


def test_shutdown_drains_or_aborts():
    params = SamplingParams(max_tokens=40, ignore_eos=True)

    async def run(drain: bool):
        llm = _engine()
        task = asyncio.ensure_future(_collect(llm, PROMPTS[0], params, "r", RequestOutputKind.DELTA))
        await asyncio.sleep(0.02)
        await asyncio.to_thread(llm.shutdown, drain)
        result = (await asyncio.gather(task, return_exceptions=True))[0]
        with pytest.raises(EngineDeadError):
            await llm.add_request("late", PROMPTS[0], params)
        assert not llm.is_running
        return result

    drained = asyncio.run(run(drain=True))
    assert len(drained[0][0]) == 40
    assert isinstance(asyncio.run(run(drain=False)), EngineDeadError)
