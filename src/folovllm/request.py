"""A request's life in the engine: its tokens, where it stands, and its timings.

vLLM v1's central idea: a request is ``num_computed_tokens`` out of
``num_tokens``. Prefill, decode and recompute after preemption are the same
thing seen at different values of those two numbers.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from folovllm.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH_CAPPED: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
        }.get(self)


@dataclass
class RequestMetrics:
    """Wall-clock stamps (``time.perf_counter``) from which TTFT/TPOT are derived."""

    arrival_time: float = field(default_factory=time.perf_counter)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @property
    def ttft(self) -> float | None:
        """Time to first token, from arrival (includes queueing)."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    def tpot(self, num_output_tokens: int) -> float | None:
        """Mean time per output token after the first."""
        if num_output_tokens < 2 or self.last_token_time is None or self.first_token_time is None:
            return None
        return (self.last_token_time - self.first_token_time) / (num_output_tokens - 1)

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int
    eos_token_ids: tuple[int, ...] = ()
    priority: int = 0
    prompt: str | None = None
    parent_id: str | None = None
    index: int = 0
    fork_from: str | None = None  # copy-on-write: share this request's prompt blocks
    cache_salt: str | None = None  # prefix caching: only requests with the same salt share blocks
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_output_placeholders: int = 0  # sampled on the device, not yet seen by the host (async scheduling)
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    num_cached_tokens: int | None = None  # tokens not computed at first admission (prefix hit or fork)
    block_hashes: list[bytes] = field(default_factory=list, repr=False)  # one per full block (prefix caching)
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    _all_token_ids: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._all_token_ids = self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output tokens: one list kept up to date, never rebuilt (read every step)."""
        return self._all_token_ids

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def sort_key(self) -> tuple[int, float]:
        """Lower sorts first: priority value, then arrival (vLLM's convention)."""
        return (self.priority, self.metrics.arrival_time)
