"""``OpenAIServing``: what every generation endpoint does alike.

Check the model name, turn the request into ``SamplingParams`` (a bad field is an
HTTP 400 naming it), queue every prompt before the first byte of the response (so a
bad prompt is a 400, not a broken stream), then read all prompts' outputs as they come.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

from folovllm.engine.async_llm import AsyncLLM, RequestOutputCollector
from folovllm.engine.llm_engine import PromptType
from folovllm.entrypoints.openai.metrics import ServerMetrics
from folovllm.entrypoints.openai.models.serving import OpenAIServingModels
from folovllm.entrypoints.openai.protocol import APIError, ErrorInfo, ErrorResponse, SamplingRequest, UsageInfo
from folovllm.outputs import CompletionOutput, RequestOutput
from folovllm.sampling_params import SamplingParams

T = TypeVar("T")
SSE_DONE = "data: [DONE]\n\n"


def sse(event: BaseModel) -> str:
    """One server-sent event."""
    return f"data: {event.model_dump_json()}\n\n"


def bad_request(err: ValueError, request: BaseModel, prompt_field: str) -> APIError:
    """A 400 whose ``param`` is the field the message starts with (our ``ValueError``s name it first)."""
    message = str(err)
    first = message.split(" ", 1)[0].strip(",:").split("[", 1)[0]  # "prompt_token_ids[3] is ..." names the field
    fields = type(request).model_fields
    param = prompt_field if first in ("prompt", "prompt_token_ids") else first if first in fields else None
    return APIError(message, param=param)


@dataclass
class ChoiceState:
    """What one choice has produced so far (deltas added up)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    offset: int = 0  # completions' text_offset of the next token
    logprobs: Any = None  # in the endpoint's own format

    def add(self, delta: CompletionOutput) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason

    def is_new(self, delta: CompletionOutput) -> bool:
        """Whether a delta carries anything to send: tokens, or the finish of a choice still open."""
        return self.finish_reason is None and (bool(delta.token_ids) or delta.finish_reason is not None)


def count_completion_tokens(usage: UsageInfo, choices: dict[int, ChoiceState]) -> UsageInfo:
    """Fill ``usage``'s completion and total counts from the choices (its prompt count is the caller's)."""
    usage.completion_tokens = sum(len(c.token_ids) for c in choices.values())
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    return usage


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, models: OpenAIServingModels, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.models = models
        self.metrics = metrics

    def sampling_params(
        self, request: SamplingRequest, max_tokens: int | None, logprobs: int | None, prompt_field: str
    ) -> SamplingParams:
        self.models.check(request.model)
        try:
            return request.to_sampling_params(max_tokens, logprobs)
        except ValueError as err:
            raise bad_request(err, request, prompt_field) from None

    def token_text(self, token_id: int) -> str:
        """A token as text for logprobs; ``token_id:N`` when the model has no tokenizer (vLLM's spelling)."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            return f"token_id:{token_id}"
        return tokenizer.decode([token_id], clean_up_tokenization_spaces=False)

    async def start(
        self, request_id: str, prompts: list[PromptType], params: SamplingParams, request: BaseModel, prompt_field: str
    ) -> list[RequestOutputCollector]:
        """Queue every prompt as ``{request_id}-{i}``; if one is refused, none stays queued."""
        collectors: list[RequestOutputCollector] = []
        try:
            for i, prompt in enumerate(prompts):
                collectors.append(await self.engine.add_request(f"{request_id}-{i}", prompt, params))
        except ValueError as err:
            for c in collectors:
                await self.engine.abort(c.request_id)
            raise bad_request(err, request, prompt_field) from None
        return collectors

    async def outputs(
        self, collectors: list[RequestOutputCollector], arrival: float
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, delta output) of every prompt as tokens arrive; metrics recorded on the way."""
        trackers = [self.metrics.track(arrival) for _ in collectors]
        async with aclosing(merge_async_iterators([self.engine.outputs(c) for c in collectors])) as merged:
            async for i, out in merged:
                trackers[i].observe(out)
                yield i, out


def top_logprobs(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely tokens of one position (the engine also keeps the sampled one, which may rank lower)."""
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def error_event(err: Exception) -> str:
    """A failure after the stream started: one error event (vLLM's way), then the stream ends."""
    info = err.body.error if isinstance(err, APIError) else ErrorInfo(message=str(err), type="internal_error")
    return sse(ErrorResponse(error=info))


async def merge_async_iterators(iterators: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async iterators as they come, tagged with the iterator's index.

    Closing the merged iterator cancels the readers, which close each iterator
    (for ``AsyncLLM.outputs``: aborts its request). Every level closes the one below
    explicitly (``aclosing``): a generator left at a ``yield`` is otherwise closed only when collected.
    """
    if len(iterators) == 1:
        async with aclosing(iterators[0]) as it:
            async for item in it:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()
    done = object()

    async def drain(i: int, it: AsyncIterator[T]) -> None:
        try:
            async with aclosing(it):
                async for item in it:
                    await queue.put((i, item, None))
            await queue.put((i, done, None))
        except Exception as err:  # re-raised to the reader below
            await queue.put((i, done, err))

    tasks = [asyncio.ensure_future(drain(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, error = await queue.get()
            if error is not None:
                raise error
            if item is done:
                remaining -= 1
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnected(raw_request: Request, work: Awaitable[T]) -> T | None:
    """Run ``work`` unless the client hangs up first; then cancel it (which aborts its requests)."""

    async def hang_up() -> None:
        while (await raw_request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(hang_up())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return None if task.cancelled() else task.result()
