"""``LLMEngine``: add requests, then ``step()`` until none is left.

One step = ``Scheduler.schedule`` -> ``ModelRunner.execute_model`` (one forward
for the whole batch) -> ``Scheduler.update_from_output`` -> detokenize and
build ``RequestOutput``s. Input validation happens in ``add_request``, before
any compute, so a bad request never disturbs the ones already running.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from folovllm.attention.selector import resolve_attention_backend
from folovllm.config import EngineConfig
from folovllm.core.kv_cache_manager import (BaseKVCacheManager, ContiguousKVCacheManager,
                                            KVCacheManager, KVCacheUsage, NoKVCacheManager)
from folovllm.core.sched.output import SchedulerOutput
from folovllm.core.sched.scheduler import Scheduler
from folovllm.engine.detokenizer import IncrementalDetokenizer
from folovllm.model_executor.model_loader import load_model
from folovllm.outputs import CompletionOutput, ModelRunnerOutput, RequestMetricsSummary, RequestOutput
from folovllm.request import Request, RequestStatus
from folovllm.sampling_params import SamplingParams
from folovllm.worker.model_runner import ModelRunner

PromptType = str | dict[str, Any]


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
class _ParentRequest:
    """A user request; ``n > 1`` fans it out into ``n`` child sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
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
        if sched_cfg.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({sched_cfg.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}): without chunked prefill a whole prompt runs in one step")
        self.vocab_size = loaded.hf_config.vocab_size
        self.eos_token_ids = _eos_ids(loaded)
        self.model_runner = ModelRunner(config, loaded)
        self.kv_cache_manager = self._make_kv_cache_manager()
        self.scheduler = Scheduler(sched_cfg, self.kv_cache_manager, self.max_model_len,
                                   recompute_each_step=config.cache_config.kv_layout == "none")
        self.parents: dict[str, _ParentRequest] = {}
        self.stats = EngineStats()
        self.step_stats: deque[StepStats] = deque(maxlen=STEP_STATS_LIMIT if config.collect_step_stats else 0)
        self._step = 0

    def _make_kv_cache_manager(self) -> BaseKVCacheManager:
        cache = self.config.cache_config
        if cache.kv_layout == "none":
            return NoKVCacheManager()
        runner = self.model_runner
        num_blocks = runner.kv_cache_budget_bytes() // (cache.block_size * runner.kv_bytes_per_token())
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory is too small for one block of {cache.block_size} tokens "
                             f"({cache.block_size * runner.kv_bytes_per_token()} bytes)")
        runner.initialize_kv_cache(num_blocks)
        if cache.kv_layout == "contiguous":
            return ContiguousKVCacheManager(num_blocks, cache.block_size, self.max_model_len)
        return KVCacheManager(num_blocks, cache.block_size)

    # ---- requests -------------------------------------------------------------
    def process_inputs(self, prompt: PromptType, params: SamplingParams | None
                       ) -> tuple[str | None, list[int], SamplingParams, int]:
        """Validate and tokenize; returns (text, token ids, params, resolved max_tokens)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            if self.tokenizer is None:
                raise ValueError(f"prompt is text but model {self.model_name!r} has no tokenizer; "
                                 "pass {'prompt_token_ids': [...]} instead")
            text, ids = prompt, self.tokenizer(prompt).input_ids
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not ids:
                raise ValueError("prompt_token_ids must be a non-empty list of token ids")
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt_token_ids contains {bad[0]!r}, outside the vocabulary "
                                 f"[0, {self.vocab_size})")
            ids = list(ids)
        else:
            raise ValueError("prompt must be a string or a dict with 'prompt_token_ids', "
                             f"got {type(prompt).__name__}")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}, "
                             "which leaves no room to generate")
        max_tokens = params.max_tokens or self.max_model_len - len(ids)
        if len(ids) + max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                             f"max_model_len ({self.max_model_len})")
        return text, ids, params, max_tokens

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    priority: int = 0) -> None:
        self.add_processed_request(request_id, *self.process_inputs(prompt, params), priority=priority)

    def add_processed_request(self, request_id: str, text: str | None, ids: list[int],
                              params: SamplingParams, max_tokens: int, priority: int = 0) -> None:
        if request_id in self.parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        cow = self.config.cache_config.enable_cow and self.kv_cache_manager.can_fork()
        children = []
        for i in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            children.append(Request(
                request_id=child_id, prompt_token_ids=list(ids),
                sampling_params=params if params.n == 1 else params.for_child(i), max_tokens=max_tokens,
                eos_token_ids=self.eos_token_ids, priority=priority, prompt=text,
                parent_id=request_id, index=i,
                fork_from=children[0].request_id if cow and i > 0 else None))
        parent = _ParentRequest(request_id, text, list(ids), children)
        if self.tokenizer is not None:
            parent.detokenizers = {c.request_id: IncrementalDetokenizer(self.tokenizer, ids, params.stop_strings)
                                   for c in children}
        self.parents[request_id] = parent
        for child in children:
            self.scheduler.add_request(child)

    def abort_request(self, request_ids: str | list[str]) -> None:
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            parent = self.parents.pop(rid, None)
            for child in parent.children if parent else []:
                self.scheduler.finish_request(child.request_id, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self.parents)

    # ---- one step ---------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        sched_out = self.scheduler.schedule()
        t1 = time.perf_counter()
        runner_out = self.model_runner.execute_model(sched_out)
        t2 = time.perf_counter()
        updated = self.scheduler.update_from_output(sched_out, runner_out)
        outputs = self._make_outputs(updated)
        t3 = time.perf_counter()
        forward_time = t2 - t1 - runner_out.prepare_time
        host_time = (t1 - t0) + runner_out.prepare_time + (t3 - t2)
        self.stats.add(len(sched_out.scheduled), sched_out.num_scheduled_tokens, host_time, forward_time)
        usage = self._sample_kv_usage()
        if self.config.collect_step_stats:
            self._record_step(sched_out, runner_out, t1 - t0, forward_time, t3 - t2, usage)
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

    def _record_step(self, sched_out: SchedulerOutput, runner_out: ModelRunnerOutput, schedule_time: float,
                     forward_time: float, update_time: float, usage: KVCacheUsage | None) -> None:
        self.step_stats.append(StepStats(
            step=self._step, scheduled=[(s.req_id, s.num_tokens, s.is_prefill) for s in sched_out.scheduled],
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            preempted=sched_out.preempted_req_ids, schedule_time=schedule_time,
            prepare_time=runner_out.prepare_time, forward_time=forward_time,
            update_time=update_time, kv_usage=usage))

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
            out = self._request_output(parent)
            if out.finished:
                del self.parents[parent.request_id]
            outputs.append(out)
        return outputs

    def _request_output(self, parent: _ParentRequest) -> RequestOutput:
        completions = []
        for child in parent.children:
            detok = parent.detokenizers.get(child.request_id)
            lps = child.logprobs if child.sampling_params.logprobs is not None else None
            completions.append(CompletionOutput(
                index=child.index, text=detok.text if detok else "", token_ids=list(child.output_token_ids),
                finish_reason=child.status.finish_reason, stop_reason=child.stop_reason, logprobs=lps,
                cumulative_logprob=sum(d[t] for d, t in zip(lps, child.output_token_ids)) if lps else None))
        finished = all(c.is_finished for c in parent.children)
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, completions,
                             finished, _summary(parent.children))


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
        num_preemptions=sum(c.num_preemptions for c in children))


def _eos_ids(loaded) -> tuple[int, ...]:
    """EOS ids from the model config (an int or a list, as Llama-3 has), else the tokenizer's."""
    eos = getattr(loaded.hf_config, "eos_token_id", None)
    if eos is None and loaded.tokenizer is not None:
        eos = loaded.tokenizer.eos_token_id
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
