"""``OpenAIServingCompletion``: a completions request -> engine requests -> one response or a stream.

Choice ``i * n + j`` is sample ``j`` of prompt ``i`` (OpenAI's order for several prompts).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from folovllm.engine.llm_engine import PromptType
from folovllm.entrypoints.openai.completion.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
)
from folovllm.entrypoints.openai.protocol import APIError, UsageInfo, now, random_id
from folovllm.entrypoints.openai.serving_engine import (
    SSE_DONE,
    ChoiceState,
    OpenAIServing,
    count_completion_tokens,
    error_event,
    sse,
    top_logprobs,
)
from folovllm.outputs import CompletionOutput, RequestOutput


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        """Validate and queue every prompt, then answer (or stream) as the engine produces tokens."""
        arrival = time.perf_counter()
        params = self.sampling_params(request, request.max_tokens, request.logprobs, "prompt")
        request_id = random_id("cmpl")
        collectors = await self.start(request_id, _prompts(request.prompt), params, request, "prompt")
        outputs = self.outputs(collectors, arrival)
        if request.stream:
            return self._stream(request, request_id, params.n, outputs)
        return await self._full(request, request_id, params.n, outputs)

    async def _full(
        self, request: CompletionRequest, request_id: str, n: int, outputs: AsyncIterator[tuple[int, RequestOutput]]
    ) -> CompletionResponse:
        choices: dict[int, ChoiceState] = {}
        usage = UsageInfo()
        async for i, out in outputs:
            for c in out.outputs:
                choice = choices.setdefault(i * n + c.index, ChoiceState())
                self._advance(choice, c, request.logprobs)
            usage.prompt_tokens += len(out.prompt_token_ids) if out.finished else 0
        count_completion_tokens(usage, choices)
        return CompletionResponse(
            id=request_id,
            model=self.models.served_model_name,
            usage=usage,
            choices=[
                CompletionResponseChoice(
                    index=k,
                    text=c.text,
                    logprobs=c.logprobs,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                    token_ids=c.token_ids if request.return_token_ids else None,
                )
                for k, c in sorted(choices.items())
            ],
        )

    async def _stream(
        self, request: CompletionRequest, request_id: str, n: int, outputs: AsyncIterator[tuple[int, RequestOutput]]
    ) -> AsyncIterator[str]:
        """One event per new piece of a choice (a token, or a finish), usage last if asked, then ``[DONE]``."""
        created, model = now(), self.models.served_model_name
        choices: dict[int, ChoiceState] = {}
        usage = UsageInfo()
        try:
            async with aclosing(outputs):
                async for i, out in outputs:
                    events = []
                    for c in out.outputs:
                        choice = choices.setdefault(i * n + c.index, ChoiceState())
                        if not choice.is_new(c):
                            continue
                        start = len(choice.token_ids)
                        logprobs = self._advance(choice, c, request.logprobs)
                        events.append(
                            CompletionResponseChoice(
                                index=i * n + c.index,
                                text=c.text,
                                logprobs=logprobs,
                                finish_reason=c.finish_reason,
                                stop_reason=c.stop_reason,
                                token_ids=choice.token_ids[start:] if request.return_token_ids else None,
                            )
                        )
                    usage.prompt_tokens += len(out.prompt_token_ids) if out.finished else 0
                    if events:
                        yield sse(CompletionStreamResponse(id=request_id, created=created, model=model, choices=events))
            if request.include_usage:
                count_completion_tokens(usage, choices)
                yield sse(CompletionStreamResponse(id=request_id, created=created, model=model, choices=[], usage=usage))
        except Exception as err:  # the stream has started: report in-band
            yield error_event(err)
        yield SSE_DONE

    def _advance(self, choice: ChoiceState, delta: CompletionOutput, num_logprobs: int | None) -> CompletionLogProbs | None:
        """Add a delta to a choice; returns the delta's logprobs in OpenAI's legacy format."""
        choice.add(delta)
        if delta.logprobs is None or num_logprobs is None:
            return None
        lp = CompletionLogProbs()
        for token, entry in zip(delta.token_ids, delta.logprobs):
            text = self.token_text(token)
            lp.tokens.append(text)
            lp.token_logprobs.append(entry.get(token))
            lp.top_logprobs.append({self.token_text(t): v for t, v in top_logprobs(entry, num_logprobs)})
            lp.text_offset.append(choice.offset)
            choice.offset += len(text)
        if choice.logprobs is None:
            choice.logprobs = CompletionLogProbs()
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(choice.logprobs, name).extend(getattr(lp, name))
        return lp


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[PromptType]:
    """OpenAI's four prompt shapes as engine prompts: text, or ``{"prompt_token_ids": [...]}``."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError("prompt must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        return [{"prompt_token_ids": prompt}]
    return [p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompt]
