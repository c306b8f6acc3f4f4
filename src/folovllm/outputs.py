"""What ``LLM.generate`` returns: vLLM's ``RequestOutput`` / ``CompletionOutput``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CompletionOutput:
    """One sampled sequence of a request (``n > 1`` gives several)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetricsSummary:
    """Per-request timings in seconds (``None`` until they exist) and token counts."""

    ttft: float | None
    tpot: float | None
    e2e_latency: float | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetricsSummary | None = None
    num_cached_tokens: int | None = None  # prompt tokens whose KV was reused, not computed (vLLM's field)

    def __repr__(self) -> str:
        texts = [o.text for o in self.outputs]
        return (
            f"RequestOutput(request_id={self.request_id!r}, prompt={self.prompt!r}, "
            f"outputs={texts!r}, finished={self.finished})"
        )


@dataclass
class ModelRunnerOutput:
    """What the runner gives back: one sampled token (or None) per scheduled request.

    ``prepare_time`` is host time spent building tensors; ``forward_time`` covers
    the forward and sampling up to the host reading the sampled ids (so it
    includes waiting for the device). ``device_time`` is the step's own forward
    and sampling time (CUDA events on a GPU, so other steps queued around it do
    not count), measured when dynamic chunk sizing needs it; ``step_interval``
    the time from the previous timed step's end to this one's on the same clock,
    which adds any wait of the device for the host: the gap between two tokens.
    """

    sampled_token_ids: list[int | None]
    logprobs: list[dict[int, float] | None]
    prepare_time: float = 0.0
    forward_time: float = 0.0
    device_time: float | None = None
    step_interval: float | None = None
