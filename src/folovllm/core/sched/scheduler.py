"""The iteration-level scheduler (vLLM v1 shape).

Every step it decides which requests run and how many tokens each gets, under
``max_num_seqs`` and ``max_num_batched_tokens``. Running requests go first; if
KV memory runs out, the lowest-priority running request is preempted by
recompute (its memory freed, itself requeued at the front). Waiting requests
join only in steps without preemption. It never touches a tensor.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from folovllm.config import SchedulerConfig
from folovllm.core.kv_cache_manager import BaseKVCacheManager
from folovllm.core.sched.output import ScheduledRequest, SchedulerOutput
from folovllm.outputs import ModelRunnerOutput
from folovllm.request import Request, RequestStatus


@dataclass
class _StepBudget:
    """What one ``schedule()`` call has handed out so far."""

    tokens_left: int
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    def take(self, req: Request, num_tokens: int) -> None:
        self.scheduled.append((req, num_tokens))
        self.tokens_left -= num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: BaseKVCacheManager,
                 max_model_len: int, recompute_each_step: bool = False) -> None:
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.max_model_len = max_model_len
        self.recompute_each_step = recompute_each_step  # M0: no KV cache, redo the whole sequence
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.held: dict[str, list[Request]] = {}  # copy-on-write siblings waiting for their leader's prefill
        self._finished_since_last_step: list[str] = []
        self.num_preemptions = 0

    # ---- queue management -------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        if request.fork_from is not None and request.fork_from in self.requests:
            self.held.setdefault(request.fork_from, []).append(request)
            return
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        if self.config.policy == "priority":
            pos = next((i for i, r in enumerate(self.waiting) if request.sort_key() < r.sort_key()),
                       len(self.waiting))
            self.waiting.insert(pos, request)
        else:
            self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running or self.held)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running) + sum(len(h) for h in self.held.values())

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """Retire a request from wherever it is (used for aborts and stop strings)."""
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        for siblings in self.held.values():
            if req in siblings:
                siblings.remove(req)
        req.status = status
        self._free(req)

    def _free(self, req: Request) -> None:
        self.kv_cache_manager.free(req)
        self._release_siblings(req)
        self._finished_since_last_step.append(req.request_id)
        del self.requests[req.request_id]

    def _release_siblings(self, leader: Request) -> None:
        """The leader's prompt is in the cache (or never will be): let its siblings queue."""
        for sibling in reversed(self.held.pop(leader.request_id, [])):
            if leader.is_finished:
                sibling.fork_from = None
            self.waiting.appendleft(sibling)

    # ---- one step -----------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Running requests first (preempting if KV memory runs out), then new ones while room is left."""
        if self.config.policy == "priority":
            self.running.sort(key=Request.sort_key)
        step = _StepBudget(self.config.max_num_batched_tokens)
        self._schedule_running(step)
        if not step.preempted and not (self.config.batching == "static" and self.running):
            self._schedule_waiting(step)
        out = SchedulerOutput(
            scheduled=[self._describe(req, n) for req, n in step.scheduled],
            preempted_req_ids=[r.request_id for r in step.preempted],
            finished_req_ids=self._finished_since_last_step,
            block_copies=self.kv_cache_manager.take_block_copies())
        self._finished_since_last_step = []
        return out

    def _schedule_running(self, step: _StepBudget) -> None:
        """Give every running request its new tokens; when KV memory runs out, preempt from the back."""
        i = 0
        while i < len(self.running):
            req = self.running[i]
            num_new = req.num_tokens - req.num_computed_tokens
            if num_new > step.tokens_left:
                i += 1
                continue
            while not self.kv_cache_manager.allocate_slots(req, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                step.preempted.append(victim)
                if victim is req:
                    break
            else:
                step.take(req, num_new)
                i += 1

    def _schedule_waiting(self, step: _StepBudget) -> None:
        """Admit waiting requests in queue order while the token budget, ``max_num_seqs`` and KV memory allow."""
        max_seqs = 1 if self.config.batching == "sequential" else self.config.max_num_seqs
        while self.waiting and len(self.running) < max_seqs:
            req = self.waiting[0]
            forked = self._try_fork(req)
            num_new = req.num_tokens - req.num_computed_tokens
            if num_new > step.tokens_left or not self.kv_cache_manager.allocate_slots(req, num_new):
                if forked:
                    self.kv_cache_manager.free(req)
                    req.num_computed_tokens = 0
                break
            self.waiting.popleft()
            self.running.append(req)
            req.status = RequestStatus.RUNNING
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = time.perf_counter()
            step.take(req, num_new)

    def _describe(self, req: Request, num_new: int) -> ScheduledRequest:
        start = req.num_computed_tokens
        offset, new_blocks = self.kv_cache_manager.take_new_block_ids(req.request_id)
        return ScheduledRequest(req_id=req.request_id, token_ids=req.all_token_ids[start:start + num_new],
                                start_pos=start, num_prompt_tokens=req.num_prompt_tokens, block_offset=offset,
                                new_block_ids=new_blocks, sampling_params=req.sampling_params,
                                sample=start + num_new == req.num_tokens)

    def _try_fork(self, req: Request) -> bool:
        """Copy-on-write: share the leader's prompt blocks, recompute only the last prompt token."""
        leader = self.requests.get(req.fork_from) if req.fork_from else None
        if (leader is None or leader.status != RequestStatus.RUNNING or req.num_computed_tokens
                or leader.num_computed_tokens < req.num_prompt_tokens):
            return False
        req.num_computed_tokens = req.num_prompt_tokens - 1
        self.kv_cache_manager.fork(leader, req)
        return True

    def _preempt(self, req: Request) -> None:
        """Recompute-style preemption: drop the KV, keep the tokens, go to the front of the queue."""
        self.running.remove(req)
        self.kv_cache_manager.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ---- after the forward ---------------------------------------------------
    def update_from_output(self, sched_out: SchedulerOutput, runner_out: ModelRunnerOutput) -> list[Request]:
        """Append sampled tokens, apply token-level stops, free finished requests.

        Returns the requests that got a new token (finished ones included).
        """
        updated = []
        now = time.perf_counter()
        for sched, token, logprobs in zip(sched_out.scheduled, runner_out.sampled_token_ids,
                                          runner_out.logprobs):
            req = self.requests.get(sched.req_id)
            if req is None:  # aborted while its step was in flight
                continue
            req.num_computed_tokens += sched.num_tokens
            if req.num_computed_tokens >= req.num_prompt_tokens:
                self._release_siblings(req)
            if not sched.sample or token is None:
                continue
            req.append_output_token(token)
            if logprobs is not None:
                req.logprobs.append(logprobs)
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            req.metrics.last_token_time = now
            updated.append(req)
            status = self._check_stop(req, token)
            if status is not None:
                self.running.remove(req)
                req.status = status
                req.metrics.finished_time = now
                self._free(req)
            elif self.recompute_each_step:
                req.num_computed_tokens = 0
        return updated

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        params = req.sampling_params
        if not params.ignore_eos and token in req.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if token in params.stop_token_ids:
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH_CAPPED
        return None

