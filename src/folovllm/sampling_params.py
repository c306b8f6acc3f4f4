"""``SamplingParams``: vLLM's field names and defaults, validated on construction.

Every field is checked for type (a ``bool`` is not a number here, though Python
says ``True == 1``), range and finiteness, and so are the values derived from it
(the seeds of ``n > 1`` samples, the tensors the sampler builds), so nothing a
user can pass fails later inside a step. Bad input raises ``ValueError`` naming
the field and what it accepts; a wrong type raises ``InvalidTypeError``, both a
``TypeError`` and a ``ValueError`` (``folovllm/exceptions.py``). Limits that depend on the model (``logprobs`` against
``ModelConfig.max_logprobs``, token ids against the vocabulary, ``max_tokens``
against ``max_model_len``) are the engine's to check, in ``process_inputs``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace
from numbers import Integral, Real
from typing import Any

from folovllm.exceptions import InvalidTypeError

_GREEDY_EPS = 1e-5
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # seeds and top_k live in int64 (torch generators, sampler tensors)
FLOAT32_MAX = 3.4028234663852886e38  # temperature becomes a float32 tensor row
MAX_N = 128  # samples per request, OpenAI's cap: n=10**9 would build a billion sequences before any check


def _bound(x: int) -> str:
    return {INT64_MIN: "-2**63", INT64_MAX: "2**63 - 1"}.get(x, str(x))


def show(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages.

    A 10**5000 has no repr in Python 3.11+ (``sys.get_int_max_str_digits``), nor has a
    list holding one, and a user object's ``__repr__`` may raise: the message must not.
    """
    if isinstance(value, int) and value.bit_length() > 256:
        return f"<int of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - any failure to print becomes a placeholder, never the error itself
        return f"<unprintable {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_int(name: str, value: Any, lo: int, hi: int = INT64_MAX, allow_none: bool = False) -> int | None:
    """``value`` as a plain ``int`` in ``[lo, hi]``; numpy integers pass, bools and floats do not."""
    if value is None and allow_none:
        return None
    expected = f"an integer in [{_bound(lo)}, {_bound(hi)}]{' or None' if allow_none else ''}"
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise InvalidTypeError(f"{name} must be {expected}, got {show(value)}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be {expected}, got {show(value)}")
    return int(value)


def check_real(name: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> float:
    """``value`` as a finite ``float`` in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); no bools, no nan/inf."""
    expected = f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if not isinstance(value, Real) or isinstance(value, bool):
        raise InvalidTypeError(f"{name} must be {expected}, got {show(value)}")
    if not (
        (isinstance(value, Integral) or math.isfinite(value)) and (lo < value if lo_open else lo <= value) and value <= hi
    ):
        raise ValueError(f"{name} must be {expected}, got {show(value)}")
    return float(value)


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
    Numbers are stored normalized (plain ``int``/``float``, ``top_k`` -1 as 0,
    ``stop`` as the list ``stop_strings``); the engine validates a fresh copy of
    the params it is given, so mutating an instance later cannot reach a request.
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
        self.n = check_int("n", self.n, 1, MAX_N)
        self.temperature = check_real("temperature", self.temperature, 0.0, FLOAT32_MAX)
        self.top_p = check_real("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        top_k = check_int("top_k", self.top_k, -1)
        self.top_k = 0 if top_k == -1 else top_k
        self.min_p = check_real("min_p", self.min_p, 0.0, 1.0)
        self.seed = check_int("seed", self.seed, INT64_MIN, allow_none=True)
        if self.seed is not None and self.seed + self.n - 1 > INT64_MAX:
            raise ValueError(
                f"seed + n - 1 must be at most 2**63 - 1 (sample i of n uses seed + i), got seed={self.seed} with n={self.n}"
            )
        self.max_tokens = check_int("max_tokens", self.max_tokens, 1, allow_none=True)
        self.stop_strings = self._stop_strings()
        self.stop_token_ids = self._stop_token_ids()
        if not isinstance(self.ignore_eos, bool):
            raise InvalidTypeError(f"ignore_eos must be a bool, got {show(self.ignore_eos)}")
        self.logprobs = check_int("logprobs", self.logprobs, 0, allow_none=True)
        if not isinstance(self.output_kind, RequestOutputKind):
            raise InvalidTypeError(f"output_kind must be a RequestOutputKind, got {show(self.output_kind)}")

    def _stop_strings(self) -> list[str]:
        stop = self.stop
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else list(stop) if isinstance(stop, (list, tuple)) else None
        if stops is None or not all(isinstance(s, str) for s in stops):
            raise InvalidTypeError(f"stop must be a non-empty string or a list of them, got {show(stop)}")
        if not all(stops):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {show(stop)}")
        return stops

    def _stop_token_ids(self) -> list[int]:
        ids = self.stop_token_ids
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise InvalidTypeError(f"stop_token_ids must be a list of token ids, got {show(ids)}")
        return [check_int(f"stop_token_ids[{i}]", t, 0) for i, t in enumerate(ids)]

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def for_child(self, index: int) -> "SamplingParams":
        """The params of sample ``index`` of an ``n > 1`` request: one sample, seed ``seed + index``.

        ``replace`` carries every other field over, including any added later.
        """
        return replace(self, n=1, seed=None if self.seed is None else self.seed + index)
