"""How long a step takes, from what it carries: a linear model fitted online (M5, dynamic chunk sizing).

A step runs ``T`` new tokens for requests whose contexts end at ``seq_len_i``
(``q_i`` new tokens each). Its time is modelled as

    t = c0 + cp * [any q_i > 1] + c1 * T + c2 * sum(seq_len_i) + c3 * sum(q_i * seq_len_i)

``c0`` is what every step pays (weights read once, launches), ``cp`` what a step
pays once for carrying any prefill (with decode-only CUDA graphs such a step runs
the eager forward, and with a small model the host's launches then set its pace;
with mixed-step graphs it is small), ``c1`` the linear layers' work per token,
``c2`` reading a request's KV once, ``c3`` attention's work per (query, key) pair.
Without ``cp`` an eager forward is blamed on whatever grows with prefills (context
reads) and prefills are then allowed almost nothing. The scheduler feeds it every measured step
and asks how many prefill tokens still fit under a target step time.
Decode-only steps cannot tell ``c2`` from ``c3`` (``q_i = 1``), so the model
answers only once the steps it saw span every feature (``ready``), and a window
that stops spanning them (a stretch of decode-only steps) keeps the last full fit:
otherwise the prompt that ends such a stretch would be sized by the token budget
alone, one whole-budget chunk, the very stall the target exists to prevent.

A least-squares fit predicts a step's *typical* time, so chunks sized to fill the
target land half their steps above it (on the H200, qwen3-8b: prompt-carrying
steps at a 20 ms target had a median of 20.5 ms and a p99 of 23.9 ms). The target
is a tail latency, so the scheduler aims lower, at ``aim = target / tail_factor``,
and the model steers ``tail_factor`` by feedback on the target itself: a step
measured over it raises the factor about ``TAIL_GAIN``, one that met it lowers the
factor 99 times less, so the factor settles where 1% of the steps run over, the
p99 of the step times on the target (an online quantile estimate). Decode-only
steps over the target are not counted (no chunk size makes them shorter), those
under it are: the p99 a client sees is over every gap. A factor learned as a ratio to
the price instead (the 98th percentile of measured / predicted over prompt steps
priced near the target) could move only when such a step ran, and a cautious aim
ran none: on the H200 a few slow intervals set it at 3.7 for the rest of a run
(qwen3-0.6b at 32 req/s, 39% of a fixed budget's throughput); a factor steered to
2% of the prompt steps ran over the target when most steps carried prompts
(qwen3-8b at a 15 ms target: 73% of the steps, p99 ITL 17.3 ms).

Fitted on the steps the controller itself sized, the terms are not identified: every
chunk is cut to fill one predicted time, so the window's features move together and
least squares trades one term for another (six saturated H200 runs priced a 512-token
chunk anywhere from 2.9 to 86 ms). ``calibrate`` fits the model once, before serving,
from designed steps (``calibration_families``: decode batches, chunks and mixed steps
whose features vary independently), as system identification does with a test
signal; serving then only steers ``tail_factor``, one number its own steps do pin down.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

_UNBOUNDED = 1 << 62
Shape = tuple[int, int]  # (new tokens, context length after them) of one request in a step


class StepCostModel:
    NUM_FEATURES = 5
    # A step this many times slower than predicted and than the window's median step is a stall (a JIT
    # compile, a GC pause), not a property of its shape: one 750 ms compile in the window made the H200's fit
    # call a 20 ms target unreachable. More than MAX_OUTLIERS such steps in a row are the device changing.
    OUTLIER_FACTOR = 10.0
    MAX_OUTLIERS = 3
    TAIL_QUANTILE = 0.99
    # A step over the target raises the factor ~10%; ~100 steps that met it undo that. The cap bounds how far
    # a run of stalls can shrink the chunks (the factor comes back down at the same pace either way).
    TAIL_GAIN = 0.1
    MAX_TAIL_FACTOR = 4.0
    STEERED_LIMIT = 65536  # steps ``steered`` keeps: a ring buffer, never a leak

    def __init__(self, window: int = 256, min_samples: int = 8, target: float = 0.0) -> None:
        self._rows: deque[np.ndarray] = deque(maxlen=window)
        self._times: deque[float] = deque(maxlen=window)
        self._measured_as: deque[str] = deque(maxlen=window)  # "device" (the forward) or "interval" (the gap)
        self.min_samples = min_samples
        self.target = target  # seconds a step may take (0: no target, the factor stays 1)
        self.tail_factor = 1.0
        # Per steered step: (predicted s, measured s, carried a prompt, tail factor after it). What a benchmark
        # reads to tell a controller that leaves room (steps far under the target) from a model that misprices.
        self.steered: deque[tuple[float, float, bool, float]] = deque(maxlen=self.STEERED_LIMIT)
        self._coef: np.ndarray | None = None
        self._stale = False
        self.calibration: dict[str, list] = {}  # the designed steps (shapes) and their measured seconds
        self.num_outliers = 0
        self._outliers_in_a_row = 0

    @staticmethod
    def features(shapes: list[Shape]) -> np.ndarray:
        q = np.array([s[0] for s in shapes], dtype=np.float64)
        seq = np.array([s[1] for s in shapes], dtype=np.float64)
        return np.array([1.0, float((q > 1).any()), q.sum(), seq.sum(), (q * seq).sum()])

    def observe(self, shapes: list[Shape], seconds: float, measured_as: str = "device") -> None:
        """One measured step (outliers, see ``OUTLIER_FACTOR``, are counted and left out); ``measured_as``
        says whether ``seconds`` is the forward's device time or the interval between back-to-back steps."""
        if not shapes or seconds <= 0:
            return
        row = self.features(shapes)
        predicted = float(row @ self.coef) if self.ready else None
        typical = float(np.median(self._times)) if self._times else 0.0
        if predicted is not None and seconds > self.OUTLIER_FACTOR * max(predicted, typical):
            self._outliers_in_a_row += 1
            if self._outliers_in_a_row <= self.MAX_OUTLIERS:
                self.num_outliers += 1
                return
        self._outliers_in_a_row = 0
        if self.target and predicted is not None:
            self._steer_tail(seconds, carries_prompt=bool(row[1]))
            self.steered.append((predicted, seconds, bool(row[1]), self.tail_factor))
        self._rows.append(row)
        self._times.append(seconds)
        self._measured_as.append(measured_as)
        self._stale = True

    @property
    def num_samples(self) -> int:
        return len(self._rows)

    def window(self) -> dict[str, list]:
        """The fit's inputs (a row of ``features`` and the seconds measured, per step in the window) and the
        current fit's prediction for each: what a benchmark records to tell a fit the data cannot pin down
        (e.g. every chunk sized by the controller itself to one predicted time) from a wrong model."""
        rows = np.stack(self._rows) if self._rows else np.zeros((0, self.NUM_FEATURES))
        coef = self.coef
        return {
            "features": rows.tolist(),
            "seconds": list(self._times),
            "measured_as": list(self._measured_as),
            "predicted": None if coef is None else (rows @ coef).tolist(),
        }

    @property
    def calibrated(self) -> bool:
        """Fitted from designed steps (``calibrate``): serving's steps no longer refit the terms."""
        return bool(self.calibration)

    @property
    def coef(self) -> np.ndarray | None:
        """``[c0, cp, c1, c2, c3]`` in seconds (negative fits clipped to 0): the calibrated fit, else the one
        from the latest window that spanned every feature, or None until one has."""
        if self._stale and not self.calibrated:
            fitted = self._fit()
            self._coef = self._coef if fitted is None else fitted
            self._stale = False
        return self._coef

    @property
    def ready(self) -> bool:
        return self.coef is not None

    def _fit(self) -> np.ndarray | None:
        if len(self._rows) < self.min_samples:
            return None
        return self._solve(np.stack(self._rows), np.array(self._times))

    def _solve(self, x: np.ndarray, y: np.ndarray, nonnegative: bool = False) -> np.ndarray | None:
        """Least squares, or None when the rows do not span every feature. Negative terms are clipped to 0,
        or with ``nonnegative`` dropped and the rest refitted (non-negative least squares, by elimination)."""
        scale = np.abs(x).max(axis=0)  # columns in comparable units, so the rank test means something
        scale[scale == 0] = 1.0  # a feature no step in the window had (e.g. no prefill): rank-deficient, not NaN
        try:
            sol, _, rank, _ = np.linalg.lstsq(x / scale, y, rcond=1e-6)
        except np.linalg.LinAlgError:  # the scheduler must never fail on its cost model: size by tokens instead
            return None
        if rank < self.NUM_FEATURES:
            return None
        kept = np.ones(self.NUM_FEATURES, dtype=bool)
        while nonnegative and (sol < 0).any():
            kept &= sol >= 0
            sol = np.zeros(self.NUM_FEATURES)
            sol[kept] = np.linalg.lstsq(x[:, kept] / scale[kept], y, rcond=1e-6)[0]
        return np.maximum(sol / scale, 0.0)

    @staticmethod
    def calibration_families(max_tokens: int, max_seqs: int, max_len: int) -> list[list[list[Shape]]]:
        """Steps to time before serving, within the engine's limits, in families that each grow one feature
        (4x a step): decode batches at a short context, a decode batch's context, one chunk at the start of
        a prompt, one chunk deep into one, a chunk beside decodes. Across families the features vary
        independently; the calibration stops a family once its steps outgrow what serving will run."""
        seqs = max(1, min(max_seqs, max_tokens))
        batch = min(seqs, 16)
        deep = max_len // 2  # where a chunk deep into a prompt starts

        def grow(first: int, last: int) -> list[int]:
            sizes = [first]
            while sizes[-1] * 4 < last:
                sizes.append(sizes[-1] * 4)
            return sorted({min(n, last) for n in sizes} | {last})

        def chunk_at(q: int, context: int) -> list[Shape]:
            return [(q, context + q)]

        deep_room = max(2, min(max_tokens, max_len - deep))
        decodes = min(batch - 1, max_tokens // 2)  # beside the chunk in a mixed step
        mixed_room = max(2, min(max_tokens - decodes, max_len - deep))
        return [
            [[(1, min(16, max_len))] * b for b in grow(1, seqs)],
            [[(1, c)] * batch for c in grow(min(128, max_len - 1), max(1, max_len - 1))],
            [chunk_at(q, 0) for q in grow(min(16, max_tokens, max_len), max(2, min(max_tokens, max_len)))],
            [chunk_at(q, deep) for q in grow(min(16, deep_room), deep_room)],
            [[(1, deep)] * decodes + chunk_at(q, deep) for q in grow(min(64, mixed_room), mixed_room)],
        ]

    def calibrate(self, steps: list[list[Shape]], seconds: list[float]) -> bool:
        """Fit every term from designed steps (``calibration_families``) and keep it: from here on, measured
        steps only steer ``tail_factor``. False (and the model left to fit serving's steps) when the steps do
        not span every feature (a budget of a few tokens)."""
        coef = self._solve(np.stack([self.features(s) for s in steps]), np.array(seconds), nonnegative=True)
        if coef is not None:
            self._coef, self._stale = coef, False
            self.calibration = {"steps": [list(map(list, s)) for s in steps], "seconds": list(seconds)}
        return coef is not None

    @property
    def aim(self) -> float:
        """The predicted step time chunks are sized for: the target over the tail factor."""
        return self.target / self.tail_factor

    def _steer_tail(self, seconds: float, carries_prompt: bool) -> None:
        """One step's verdict on the aim (see the module's docstring)."""
        q = self.TAIL_QUANTILE
        if seconds <= self.target:
            step = -self.TAIL_GAIN * (1 - q)
        elif carries_prompt:
            step = self.TAIL_GAIN * q
        else:
            return
        self.tail_factor = min(self.MAX_TAIL_FACTOR, max(1.0, self.tail_factor * math.exp(step)))

    def predict(self, shapes: list[Shape]) -> float:
        """Predicted seconds for a step of these requests (``ready`` first)."""
        return float(self.features(shapes) @ self.coef)

    @property
    def prefill_cost(self) -> float:
        """``cp``: what the first prefill chunk of a step adds before its tokens cost anything."""
        return float(self.coef[1])

    def request_cost(self, num_tokens: int, seq_len: int) -> float:
        """What one request's ``num_tokens`` (context ending at ``seq_len``) add to a step, in seconds."""
        _, _, c1, c2, c3 = self.coef
        return c1 * num_tokens + c2 * seq_len + c3 * num_tokens * seq_len

    def max_chunk(self, num_computed: int, seconds: float) -> int:
        """The most new tokens a request with ``num_computed`` cached tokens can run within ``seconds``."""
        _, _, c1, c2, c3 = self.coef
        # c3*q^2 + (c1 + c2 + c3*n)*q + c2*n - seconds <= 0, with n = num_computed
        a, b, c = c3, c1 + c2 + c3 * num_computed, c2 * num_computed - seconds
        if c > 0:
            return 0
        if a == 0:
            return _UNBOUNDED if b == 0 else int(-c / b)
        return int((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a))
