"""``SamplingParams``: vLLM's field names and defaults, validated on construction."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

_GREEDY_EPS = 1e-5


class RequestOutputKind(enum.Enum):
    """What ``LLMEngine.step`` returns for a request (vLLM's names): every step the whole output so far
    (CUMULATIVE, streaming), only what is new (DELTA), or nothing until it finishes (FINAL_ONLY:
    ``LLM.generate``, which saves building an output per request per step)."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    """How to turn logits into tokens, and when to stop.

    ``top_k`` of 0 or -1 disables top-k; ``temperature`` 0 means greedy.
    ``logprobs=k`` returns the sampled token's logprob plus the top-k alternatives.
    With ``n > 1`` and a ``seed``, sample ``i`` uses ``seed + i`` (as vLLM does).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise ValueError(f"logprobs must be a non-negative integer or None, got {self.logprobs!r}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        self.stop_strings = stops
        ids = self.stop_token_ids or []
        if any(not isinstance(t, int) or t < 0 for t in ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(ids)
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def for_child(self, index: int) -> "SamplingParams":
        """The params of sample ``index`` of an ``n > 1`` request."""
        seed = None if self.seed is None else self.seed + index
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              min_p=self.min_p, seed=seed, max_tokens=self.max_tokens,
                              stop=self.stop, stop_token_ids=self.stop_token_ids,
                              ignore_eos=self.ignore_eos, logprobs=self.logprobs, output_kind=self.output_kind)
