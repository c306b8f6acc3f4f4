"""``LLMEngine``: add requests, then ``step()`` until none is left.

One step = ``Scheduler.schedule`` -> ``ModelRunner.execute_model`` (one forward
for the whole batch) -> ``Scheduler.update_from_output`` -> detokenize and
build ``RequestOutput``s. Input validation happens in ``process_inputs``, before
anything is registered: a bad request raises ``ValueError`` naming the field and
never disturbs the ones already running, and a request that passes can always run
to the end (it fits the whole KV cache alone, its values fit the sampler's tensors).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from numbers import Integral
from typing import Any

from folovllm.attention.selector import resolve_attention_backend
from folovllm.config import EngineConfig
from folovllm.core.kv_cache_manager import (
    BaseKVCacheManager,
    ContiguousKVCacheManager,
    KVCacheManager,
    KVCacheUsage,
    NoKVCacheManager,
)
from folovllm.core.kv_cache_utils import PrefixCacheStats
from folovllm.core.sched.cost_model import StepCostModel
from folovllm.core.sched.output import SchedulerOutput
from folovllm.core.sched.scheduler import Scheduler
from folovllm.engine.detokenizer import IncrementalDetokenizer
from folovllm.exceptions import InvalidTypeError
from folovllm.model_executor.model_loader import load_model
from folovllm.outputs import CompletionOutput, ModelRunnerOutput, RequestMetricsSummary, RequestOutput
from folovllm.request import Request, RequestStatus
from folovllm.sampling_params import INT64_MIN, RequestOutputKind, SamplingParams, check_int, show
from folovllm.utils import cdiv
from folovllm.worker.calibration import time_designed_steps
from folovllm.worker.model_runner import ModelRunner, StepInFlight

logger = logging.getLogger(__name__)

PromptType = str | dict[str, Any]
PROMPT_KEYS = frozenset({"prompt", "prompt_token_ids", "cache_salt"})  # vLLM's TextPrompt / TokensPrompt keys we support


STEP_STATS_LIMIT = 65536  # records kept by ``collect_step_stats``: a ring buffer, never a leak


@dataclass
class EngineStats:
    """Running totals over every step: a fixed few numbers however long the engine runs."""

    num_steps: int = 0
    num_tokens: int = 0
    num_scheduled_seqs: int = 0
    max_scheduled_seqs: int = 0
    host_time: float = 0.0
    forward_time: float = 0.0
    kv_utilization_sum: float = 0.0
    kv_usage_samples: int = 0

    @property
    def kv_utilization_mean(self) -> float | None:
        """Mean of the sampled KV utilizations (``kv_usage_interval``); None when none was sampled."""
        return self.kv_utilization_sum / self.kv_usage_samples if self.kv_usage_samples else None

    def add(self, num_seqs: int, num_tokens: int, host_time: float, forward_time: float) -> None:
        self.num_steps += 1
        self.num_tokens += num_tokens
        self.num_scheduled_seqs += num_seqs
        self.max_scheduled_seqs = max(self.max_scheduled_seqs, num_seqs)
        self.host_time += host_time
        self.forward_time += forward_time


@dataclass
class StepStats:
    """What one step did and where its time went (host vs forward)."""

    step: int
    scheduled: list[tuple[str, int, bool]]  # (request id, tokens, is_prefill)
    num_running: int
    num_waiting: int
    preempted: list[str]
    schedule_time: float
    prepare_time: float
    forward_time: float
    update_time: float
    kv_usage: KVCacheUsage | None = None

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n, _ in self.scheduled)

    @property
    def host_time(self) -> float:
        return self.schedule_time + self.prepare_time + self.update_time


@dataclass
class ProcessedInputs:
    """A request ``process_inputs`` validated and tokenized: what ``add_processed_request`` queues."""

    prompt: str | None
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int
    cache_salt: str | None = None  # prefix caching: only requests with the same salt share blocks


@dataclass
class _Launched:
    """A step on its way through the GPU, and the host time its scheduling took."""

    step: StepInFlight
    schedule_time: float


@dataclass
class _ParentRequest:
    """A user request; ``n > 1`` fans it out into ``n`` child sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    detokenizers: dict[str, IncrementalDetokenizer] = field(default_factory=dict)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        resolve_attention_backend(config)  # an impossible backend fails before any weights load
        loaded = load_model(config.model_config, allow_quantized=config.includes("M7"))
        self.model_name = loaded.name
        self.hf_config = loaded.hf_config
        self.tokenizer = loaded.tokenizer
        self.max_model_len = loaded.max_model_len
        sched_cfg = config.scheduler_config
        if sched_cfg.max_num_batched_tokens is None:
            sched_cfg.max_num_batched_tokens = max(8192, self.max_model_len)
        if sched_cfg.max_num_batched_tokens < self.max_model_len and not sched_cfg.enable_chunked_prefill:
            raise ValueError(
                f"max_num_batched_tokens ({sched_cfg.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}): without chunked prefill a whole prompt runs in one step "
                "(enable_chunked_prefill=True lifts this)"
            )
        self.vocab_size = loaded.hf_config.vocab_size
        max_logprobs = config.model_config.max_logprobs
        self.max_logprobs = self.vocab_size if max_logprobs == -1 else max_logprobs
        self.eos_token_ids = _eos_ids(loaded)
        self.model_runner = ModelRunner(config, loaded)
        self.kv_cache_manager = self._make_kv_cache_manager()
        mixed = self.model_runner.mixed_graphs
        self.scheduler = Scheduler(
            sched_cfg,
            self.kv_cache_manager,
            self.max_model_len,
            recompute_each_step=config.cache_config.kv_layout == "none",
            step_sizes=mixed.sizes if mixed is not None else (),
        )
        if sched_cfg.target_itl_ms is not None:
            self._calibrate_cost_model()
        self.parents: dict[str, _ParentRequest] = {}
        self.stats = EngineStats()
        self.step_stats: deque[StepStats] = deque(maxlen=STEP_STATS_LIMIT if config.collect_step_stats else 0)
        self._step = 0
        self._in_flight: _Launched | None = None  # async scheduling: the step whose tokens are still coming

    def _make_kv_cache_manager(self) -> BaseKVCacheManager:
        cache = self.config.cache_config
        if cache.kv_layout == "none":
            return NoKVCacheManager()
        runner = self.model_runner
        num_blocks = runner.kv_cache_budget_bytes() // (cache.block_size * runner.kv_bytes_per_token())
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory is too small for one block of {cache.block_size} tokens "
                f"({cache.block_size * runner.kv_bytes_per_token()} bytes)"
            )
        runner.initialize_kv_cache(num_blocks)
        if cache.kv_layout == "contiguous":
            return ContiguousKVCacheManager(num_blocks, cache.block_size, self.max_model_len)
        return KVCacheManager(num_blocks, cache.block_size, enable_caching=cache.enable_prefix_caching)

    def _calibrate_cost_model(self) -> None:
        """Dynamic chunk sizing: price every term of a step from designed steps before serving (see
        ``StepCostModel``: serving's own steps cannot tell the terms apart)."""
        cfg = self.config.scheduler_config
        families = StepCostModel.calibration_families(cfg.max_num_batched_tokens, cfg.max_num_seqs, self.max_model_len)
        steps, seconds = time_designed_steps(self.model_runner, families, limit=2 * cfg.target_itl_ms / 1e3)
        if not self.scheduler.cost_model.calibrate(steps, seconds):
            logger.warning("the cost model could not be calibrated at this token budget: it fits served steps")

    # ---- requests -------------------------------------------------------------
    def process_inputs(self, prompt: PromptType, params: SamplingParams | None = None) -> ProcessedInputs:
        """Validate and tokenize one request; computes and queues nothing.

        Everything that could fail later is checked here: the params (a validated
        copy is kept, so the caller's object can change afterwards), the prompt, and
        that the request's worst case (prompt + ``max_tokens``) fits the whole KV
        cache, so the scheduler can always run it, alone if need be.
        """
        params = self._check_params(params)
        text, ids = self._prompt_ids(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}, which leaves no room to generate"
            )
        max_tokens = params.max_tokens or self.max_model_len - len(ids)
        if len(ids) + max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds max_model_len ({self.max_model_len})"
            )
        kv = self.kv_cache_manager
        needed = cdiv(len(ids) + max_tokens, kv.block_size)
        if kv.num_blocks and needed > kv.num_blocks:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) needs {needed} KV blocks of "
                f"{kv.block_size} tokens, but the whole KV cache has {kv.num_blocks}: lower "
                "max_tokens or raise kv_cache_memory"
            )
        return ProcessedInputs(text, ids, params, max_tokens, _cache_salt(prompt))

    def _check_params(self, params: SamplingParams | None) -> SamplingParams:
        if params is None:
            return SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidTypeError(f"sampling_params must be a SamplingParams or None, got {type(params).__name__}")
        params = replace(params)  # re-runs every check on the current values; the request owns this copy
        if params.stop_strings and self.tokenizer is None:
            raise ValueError(f"stop strings need a tokenizer and model {self.model_name!r} has none; use stop_token_ids")
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids contains {bad[0]}, outside the vocabulary [0, {self.vocab_size})")
        if params.logprobs is not None and params.logprobs > self.max_logprobs:
            raise ValueError(f"logprobs must be at most max_logprobs ({self.max_logprobs}), got {params.logprobs}")
        return params

    def _prompt_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt: a string, ``{"prompt": text}`` or ``{"prompt_token_ids": ids}``
        (with an optional ``"prompt"`` holding the text those ids came from)."""
        if isinstance(prompt, str):
            return prompt, self._tokenize(prompt)
        if not isinstance(prompt, dict):
            raise InvalidTypeError(
                f"prompt must be a string or a dict with 'prompt' or 'prompt_token_ids', got {type(prompt).__name__}"
            )
        unknown = sorted(map(repr, set(prompt) - PROMPT_KEYS))
        if unknown:
            raise ValueError(
                f"prompt has unsupported key(s) {', '.join(unknown)}; supported: {', '.join(map(repr, sorted(PROMPT_KEYS)))}"
            )
        text = prompt.get("prompt")
        if "prompt" in prompt and not isinstance(text, str):
            raise InvalidTypeError(f"prompt['prompt'] must be a string, got {type(text).__name__}")
        if "prompt_token_ids" not in prompt:
            if text is None:
                raise ValueError("prompt must have 'prompt' or 'prompt_token_ids', got an empty dict")
            return text, self._tokenize(text)
        ids = self._check_token_ids(prompt["prompt_token_ids"], "prompt_token_ids")
        if text is not None:
            if self.tokenizer is None:
                raise ValueError(
                    f"prompt text next to prompt_token_ids cannot be checked: model {self.model_name!r} "
                    "has no tokenizer; pass prompt_token_ids alone"
                )
            if self.tokenizer(text).input_ids != ids:
                raise ValueError(
                    "prompt text does not tokenize to prompt_token_ids; pass the text the ids came from, or either one alone"
                )
        return text, ids

    def _tokenize(self, text: str) -> list[int]:
        if not text:
            raise ValueError("prompt must not be empty")
        if self.tokenizer is None:
            raise ValueError(
                f"prompt is text but model {self.model_name!r} has no tokenizer; pass {{'prompt_token_ids': [...]}} instead"
            )
        return self._check_token_ids(self.tokenizer(text).input_ids, "the tokenized prompt")

    def _check_token_ids(self, ids: Any, what: str) -> list[int]:
        if not isinstance(ids, (list, tuple)):
            raise InvalidTypeError(f"{what} must be a non-empty list of token ids, got {type(ids).__name__}")
        if not ids:
            raise ValueError(f"{what} must be a non-empty list of token ids, got {show(ids)}")
        if all(type(t) is int for t in ids) and 0 <= min(ids) and max(ids) < self.vocab_size:
            return list(ids)  # the common case, without an ABC check per token (ms at thousands of tokens)
        for i, t in enumerate(ids):
            if not isinstance(t, Integral) or isinstance(t, bool):
                raise InvalidTypeError(f"{what}[{i}] must be an integer token id, got {show(t)}")
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"{what}[{i}] is {show(t)}, outside the vocabulary [0, {self.vocab_size})")
        return [int(t) for t in ids]

    def add_request(
        self, request_id: str, prompt: PromptType, params: SamplingParams | None = None, priority: int = 0
    ) -> None:
        """Validate, then queue; a request that raises leaves the engine exactly as it was."""
        self.add_processed_request(request_id, self.process_inputs(prompt, params), priority)

    def add_processed_request(self, request_id: str, inputs: ProcessedInputs, priority: int = 0) -> None:
        """Queue a request ``process_inputs`` validated; its id must not clash with a live one.

        Samples of an ``n > 1`` request run as sequences ``"<id>#<i>"`` (``n == 1``: the id
        itself); those names are internal and never addressable by a user (``abort_request``
        looks up user ids only), and an id is refused while it would name a live sequence.
        """
        if not isinstance(request_id, str):
            raise InvalidTypeError(f"request_id must be a non-empty string, got {show(request_id)}")
        if not request_id:
            raise ValueError("request_id must be a non-empty string, got ''")
        if not isinstance(inputs, ProcessedInputs):
            raise InvalidTypeError(f"inputs must be the ProcessedInputs of process_inputs, got {type(inputs).__name__}")
        priority = check_int("priority", priority, INT64_MIN)
        params = inputs.sampling_params
        child_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        if request_id in self.parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        live = self.scheduler.requests
        clash = next((c for c in child_ids if c in live), None)
        if clash is not None:
            owner = live[clash]
            whose = f"request {owner.parent_id!r}" + (f", sample {owner.index}" if clash != owner.parent_id else "")
            raise ValueError(
                f"request_id {request_id!r} clashes with sequence {clash!r} ({whose}), which is unfinished; pick another id"
            )
        cow = self.config.cache_config.enable_cow and self.kv_cache_manager.can_fork()
        children: list[Request] = []
        for i, child_id in enumerate(child_ids):
            children.append(
                Request(
                    request_id=child_id,
                    prompt_token_ids=list(inputs.prompt_token_ids),
                    sampling_params=params if params.n == 1 else params.for_child(i),
                    max_tokens=inputs.max_tokens,
                    eos_token_ids=self.eos_token_ids,
                    priority=priority,
                    prompt=inputs.prompt,
                    parent_id=request_id,
                    index=i,
                    cache_salt=inputs.cache_salt,
                    fork_from=children[0].request_id if cow and i > 0 else None,
                )
            )
        parent = _ParentRequest(request_id, inputs.prompt, list(inputs.prompt_token_ids), children, params.output_kind)
        if self.tokenizer is not None:
            parent.detokenizers = {
                c.request_id: IncrementalDetokenizer(self.tokenizer, inputs.prompt_token_ids, params.stop_strings)
                for c in children
            }
        self.parents[request_id] = parent
        for child in children:
            self.scheduler.add_request(child)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Abort requests by the ids given to ``add_request``; unknown or finished ids are ignored."""
        ids = [request_ids] if isinstance(request_ids, str) else request_ids
        if not isinstance(ids, (list, tuple, set, frozenset)) or not all(isinstance(r, str) for r in ids):
            raise InvalidTypeError(f"request_ids must be a request id (str) or a list of them, got {show(request_ids)}")
        for rid in ids:
            parent = self.parents.pop(rid, None)
            for child in parent.children if parent else []:
                self.scheduler.finish_request(child.request_id, RequestStatus.FINISHED_ABORTED)
        self._drain_if_idle()

    def _drain_if_idle(self) -> None:
        """No request left: collect the step still in flight (its tokens are nobody's), so an idle
        engine holds no work and ``has_unfinished_requests()`` is False at once."""
        if not self.parents and self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            self._finish(in_flight)

    def has_unfinished_requests(self) -> bool:
        return bool(self.parents) or self._in_flight is not None

    # region M6: prefix caching
    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Prefix-cache lookups, hits (in tokens), hit rate and evictions so far (all zero when caching is off)."""
        kv = self.kv_cache_manager
        return kv.prefix_cache_stats if isinstance(kv, KVCacheManager) else PrefixCacheStats()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; False (nothing done) while requests still hold blocks."""
        return self.kv_cache_manager.reset_prefix_cache()

    # endregion

    # ---- one step ---------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step; return the outputs of the step that finished.

        Synchronously that is the same step. With ``async_scheduling`` it is the previous one:
        step n+1 is already queued on the GPU while the host waits for step n's tokens and turns
        them into outputs, so the GPU never idles on the host (vLLM v1's async scheduling)."""
        t0 = time.perf_counter()
        sched_out = self.scheduler.schedule()
        schedule_time = time.perf_counter() - t0
        launched = _Launched(self.model_runner.launch_step(sched_out), schedule_time)
        if not self.config.scheduler_config.async_scheduling:
            return self._finish(launched)
        finished, self._in_flight = self._in_flight, (None if sched_out.is_empty else launched)
        if finished is None:
            return self._finish(launched) if sched_out.is_empty else []
        outputs = self._finish(finished)
        self._drain_if_idle()  # everything finished with step n: step n+1 computed tokens nobody wants
        return outputs

    def _finish(self, launched: _Launched) -> list[RequestOutput]:
        """Wait for a launched step's tokens, update the scheduler and build outputs."""
        t0 = time.perf_counter()
        sched_out = launched.step.sched
        runner_out = self.model_runner.finish_step(launched.step)
        t1 = time.perf_counter()
        updated = self.scheduler.update_from_output(sched_out, runner_out)
        outputs = self._make_outputs(updated)
        update_time = time.perf_counter() - t1
        forward_time = runner_out.forward_time or (t1 - t0)
        host_time = launched.schedule_time + runner_out.prepare_time + update_time
        self.stats.add(len(sched_out.scheduled), sched_out.num_scheduled_tokens, host_time, forward_time)
        usage = self._sample_kv_usage()
        if self.config.collect_step_stats:
            self._record_step(sched_out, runner_out, launched.schedule_time, forward_time, update_time, usage)
        self._step += 1
        return outputs

    def _sample_kv_usage(self) -> KVCacheUsage | None:
        """A KV usage snapshot every ``kv_usage_interval`` steps (it walks every block: not free)."""
        every = self.config.kv_usage_interval
        if not every or self._step % every:
            return None
        usage = self.kv_cache_manager.usage()
        if usage.reserved_slots:
            self.stats.kv_utilization_sum += usage.utilization
            self.stats.kv_usage_samples += 1
        return usage

    def _record_step(
        self,
        sched_out: SchedulerOutput,
        runner_out: ModelRunnerOutput,
        schedule_time: float,
        forward_time: float,
        update_time: float,
        usage: KVCacheUsage | None,
    ) -> None:
        self.step_stats.append(
            StepStats(
                step=self._step,
                scheduled=[(s.req_id, s.num_tokens, s.is_prefill) for s in sched_out.scheduled],
                num_running=len(self.scheduler.running),
                num_waiting=len(self.scheduler.waiting),
                preempted=sched_out.preempted_req_ids,
                schedule_time=schedule_time,
                prepare_time=runner_out.prepare_time,
                forward_time=forward_time,
                update_time=update_time,
                kv_usage=usage,
            )
        )

    def _make_outputs(self, updated: list[Request]) -> list[RequestOutput]:
        touched: dict[str, _ParentRequest] = {}
        for req in updated:
            parent = self.parents[req.parent_id]
            detok = parent.detokenizers.get(req.request_id)
            if detok is not None:
                detok.append(req.output_token_ids[-1])
                if detok.stop_reason is not None and not req.is_finished:
                    req.stop_reason = detok.stop_reason
                    req.metrics.finished_time = req.metrics.last_token_time
                    self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
            touched[parent.request_id] = parent
        outputs = []
        for parent in touched.values():
            finished = all(c.is_finished for c in parent.children)
            if finished:
                del self.parents[parent.request_id]
            elif parent.output_kind == RequestOutputKind.FINAL_ONLY:
                continue
            outputs.append(self._request_output(parent))
        return outputs

    def _request_output(self, parent: _ParentRequest) -> RequestOutput:
        completions = []
        for child in parent.children:
            detok = parent.detokenizers.get(child.request_id)
            lps = child.logprobs if child.sampling_params.logprobs is not None else None
            completions.append(
                CompletionOutput(
                    index=child.index,
                    text=detok.text if detok else "",
                    token_ids=list(child.output_token_ids),
                    finish_reason=child.status.finish_reason,
                    stop_reason=child.stop_reason,
                    logprobs=lps,
                    cumulative_logprob=sum(d[t] for d, t in zip(lps, child.output_token_ids)) if lps else None,
                )
            )
        finished = all(c.is_finished for c in parent.children)
        return RequestOutput(
            parent.request_id,
            parent.prompt,
            parent.prompt_token_ids,
            completions,
            finished,
            _summary(parent.children),
            parent.children[0].num_cached_tokens,
        )


def _summary(children: list[Request]) -> RequestMetricsSummary:
    """Metrics of a request: first token of any child, last finish of all; TPOT averaged."""
    m0 = children[0].metrics
    firsts = [c.metrics.first_token_time for c in children if c.metrics.first_token_time is not None]
    ends = [c.metrics.finished_time for c in children]
    tpots = [t for c in children if (t := c.metrics.tpot(c.num_output_tokens)) is not None]
    return RequestMetricsSummary(
        ttft=min(firsts) - m0.arrival_time if firsts else None,
        tpot=sum(tpots) / len(tpots) if tpots else None,
        e2e_latency=max(ends) - m0.arrival_time if all(e is not None for e in ends) else None,
        num_prompt_tokens=children[0].num_prompt_tokens,
        num_output_tokens=sum(c.num_output_tokens for c in children),
        num_preemptions=sum(c.num_preemptions for c in children),
    )


def _cache_salt(prompt: PromptType) -> str | None:
    """``cache_salt`` (vLLM's key) of a dict prompt: requests hit only blocks cached under the same salt."""
    salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    if salt is not None and not isinstance(salt, str):
        raise InvalidTypeError(f"cache_salt must be a non-empty string, got {type(salt).__name__}")
    if salt == "":
        raise ValueError("cache_salt must be a non-empty string, got ''")
    return salt


def _eos_ids(loaded) -> tuple[int, ...]:
    """EOS ids from the model config (an int or a list, as Llama-3 has), else the tokenizer's."""
    eos = getattr(loaded.hf_config, "eos_token_id", None)
    if eos is None and loaded.tokenizer is not None:
        eos = loaded.tokenizer.eos_token_id
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
