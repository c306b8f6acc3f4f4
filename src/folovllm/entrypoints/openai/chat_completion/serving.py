"""``OpenAIServingChat``: messages -> the model's chat template -> one engine request -> response or stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from folovllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatLogProb,
    ChatLogProbs,
    ChatMessage,
    ChatTopLogProb,
    DeltaMessage,
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

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, request: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        arrival = time.perf_counter()
        num_logprobs = self._num_logprobs(request)
        params = self.sampling_params(request, request.max_completion_tokens or request.max_tokens, num_logprobs, "messages")
        prompt = {"prompt_token_ids": self.apply_chat_template(request)}
        request_id = random_id("chatcmpl")
        collectors = await self.start(request_id, [prompt], params, request, "messages")
        outputs = self.outputs(collectors, arrival)
        if request.stream:
            return self._stream(request, request_id, outputs, num_logprobs)
        return await self._full(request, request_id, outputs, num_logprobs)

    @staticmethod
    def _num_logprobs(request: ChatCompletionRequest) -> int | None:
        """``logprobs`` + ``top_logprobs`` (OpenAI's pair) as the engine's one number."""
        k = request.top_logprobs
        if k is not None and not request.logprobs:
            raise APIError("top_logprobs needs logprobs set to true", param="top_logprobs")
        if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
            raise APIError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {k}", param="top_logprobs")
        return (k or 0) if request.logprobs else None

    def apply_chat_template(self, request: ChatCompletionRequest) -> list[int]:
        """The conversation as prompt token ids, through the model's own chat template."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise APIError(
                f"model `{self.models.served_model_name}` has no chat template; use /v1/completions with a plain prompt",
                param="messages",
            )
        if not request.messages:
            raise APIError("messages must not be empty", param="messages")
        try:
            return list(
                tokenizer.apply_chat_template(
                    [m.as_dict() for m in request.messages], tokenize=True, add_generation_prompt=True, return_dict=False
                )
            )
        except Exception as err:  # a template may refuse a conversation (e.g. role order)
            raise APIError(f"the chat template rejected messages: {err}", param="messages") from None

    async def _full(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        outputs: AsyncIterator[tuple[int, RequestOutput]],
        num_logprobs: int | None,
    ) -> ChatCompletionResponse:
        choices: dict[int, ChoiceState] = {}
        usage = UsageInfo()
        async for _, out in outputs:
            for c in out.outputs:
                choice = choices.setdefault(c.index, ChoiceState())
                self._advance(choice, c, num_logprobs)
            usage.prompt_tokens = len(out.prompt_token_ids)
        count_completion_tokens(usage, choices)
        return ChatCompletionResponse(
            id=request_id,
            created=now(),
            model=self.models.served_model_name,
            usage=usage,
            choices=[
                ChatCompletionResponseChoice(
                    index=k,
                    message=ChatMessage(role="assistant", content=c.text),
                    logprobs=c.logprobs,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                    token_ids=c.token_ids if request.return_token_ids else None,
                )
                for k, c in sorted(choices.items())
            ],
        )

    async def _stream(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        outputs: AsyncIterator[tuple[int, RequestOutput]],
        num_logprobs: int | None,
    ) -> AsyncIterator[str]:
        """A first event per choice with the assistant role, then one per new piece, usage, ``[DONE]``."""
        created, model = now(), self.models.served_model_name

        def event(choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None) -> str:
            return sse(
                ChatCompletionStreamResponse(id=request_id, created=created, model=model, choices=choices, usage=usage)
            )

        choices: dict[int, ChoiceState] = {}
        usage = UsageInfo()
        try:
            yield event(
                [
                    ChatCompletionStreamChoice(index=j, delta=DeltaMessage(role="assistant", content=""))
                    for j in range(request.n)
                ]
            )
            async with aclosing(outputs):
                async for _, out in outputs:
                    events = []
                    for c in out.outputs:
                        choice = choices.setdefault(c.index, ChoiceState())
                        if not choice.is_new(c):
                            continue
                        start = len(choice.token_ids)
                        logprobs = self._advance(choice, c, num_logprobs)
                        events.append(
                            ChatCompletionStreamChoice(
                                index=c.index,
                                delta=DeltaMessage(content=c.text),
                                logprobs=logprobs,
                                finish_reason=c.finish_reason,
                                stop_reason=c.stop_reason,
                                token_ids=choice.token_ids[start:] if request.return_token_ids else None,
                            )
                        )
                    usage.prompt_tokens = len(out.prompt_token_ids)
                    if events:
                        yield event(events)
            if request.include_usage:
                count_completion_tokens(usage, choices)
                yield event([], usage)
        except Exception as err:  # the stream has started: report in-band
            yield error_event(err)
        yield SSE_DONE

    def _advance(self, choice: ChoiceState, delta: CompletionOutput, num_logprobs: int | None) -> ChatLogProbs | None:
        """Add a delta to a choice; returns the delta's logprobs in the chat format."""
        choice.add(delta)
        if delta.logprobs is None or num_logprobs is None:
            return None
        lp = ChatLogProbs(
            content=[
                self._logprob(token, entry[token], top_logprobs(entry, num_logprobs))
                for token, entry in zip(delta.token_ids, delta.logprobs)
            ]
        )
        choice.logprobs = choice.logprobs or ChatLogProbs()
        choice.logprobs.content += lp.content
        return lp

    def _logprob(self, token: int, logprob: float, top: list[tuple[int, float]]) -> ChatLogProb:
        text = self.token_text(token)
        return ChatLogProb(
            token=text,
            logprob=logprob,
            bytes=list(text.encode()),
            top_logprobs=[
                ChatTopLogProb(token=(t := self.token_text(i)), logprob=v, bytes=list(t.encode())) for i, v in top
            ],
        )
