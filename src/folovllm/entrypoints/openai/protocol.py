"""Schemas every endpoint shares: OpenAI's error body, token usage, stream options, the sampling fields.

Requests forbid unknown fields (OpenAI answers "Unrecognized request argument"), so
a misspelt option is an error instead of a silent default.
"""

from __future__ import annotations

import time
import uuid

from pydantic import BaseModel, ConfigDict, Field

from folovllm.sampling_params import RequestOutputKind, SamplingParams


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo


class APIError(Exception):
    """An error the client caused or must know about; the app turns it into ``ErrorResponse``."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class SamplingRequest(OpenAIBaseModel):
    """Fields both generation endpoints take: OpenAI's names and defaults, then vLLM's extras."""

    model: str | None = None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: int = 0
    min_p: float = 0.0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = Field(False, description="add each choice's token ids (vLLM's extra)")

    def to_sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """``SamplingParams`` checks every field and names it first in its ``ValueError``.

        Streamed or not, the serving classes add up deltas (one code path; metrics see every token)."""
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            max_tokens=max_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            output_kind=RequestOutputKind.DELTA,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
