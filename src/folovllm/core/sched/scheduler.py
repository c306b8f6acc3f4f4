"""The iteration-level scheduler (vLLM v1 shape).

Every step it decides which requests run and how many tokens each gets, under
``max_num_seqs`` and ``max_num_batched_tokens``. Running requests go first
(decodes, then prompts still being prefilled); if KV memory runs out, the
lowest-priority running request not yet scheduled in the step is preempted by
recompute (its memory freed, itself requeued at the front). Waiting requests
join only in steps without preemption, with the budget left. With chunked
prefill (M5) a prompt that does not fit takes what is left and continues next
step; with ``target_itl_ms`` the budget is also a time, spent by a cost model.
It never touches a tensor.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from folovllm.config import SchedulerConfig
from folovllm.core.block_pool import KVCacheBlock
from folovllm.core.kv_cache_manager import BaseKVCacheManager
from folovllm.core.sched.cost_model import StepCostModel
from folovllm.core.sched.output import ScheduledRequest, SchedulerOutput
from folovllm.exceptions import InvalidTypeError
from folovllm.outputs import ModelRunnerOutput
from folovllm.request import Request, RequestStatus

logger = logging.getLogger(__name__)

# Dynamic chunk sizing: the first chunk of a step gets at least this many tokens, so prompts
# still progress when the decodes alone already take the whole target time.
MIN_DYNAMIC_CHUNK = 32


@dataclass
class _StepBudget:
    """What one ``schedule()`` call has handed out so far.

    ``time_left`` (dynamic chunk sizing, once the cost model is fitted) is the
    predicted seconds left under the target step time; None budgets tokens only."""

    tokens_left: int
    time_left: float | None = None
    cost_model: StepCostModel | None = None
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    scheduled_ids: set[str] = field(default_factory=set)
    preempted: list[Request] = field(default_factory=list)
    num_chunks: int = 0  # prefill chunks (more than one token) handed out

    def take(self, req: Request, num_tokens: int) -> None:
        self.scheduled.append((req, num_tokens))
        self.scheduled_ids.add(req.request_id)
        self.tokens_left -= num_tokens
        if self.time_left is not None:
            first_chunk = num_tokens > 1 and not self.num_chunks
            self.time_left -= self.cost_model.request_cost(num_tokens, req.num_computed_tokens + num_tokens)
            self.time_left -= self.cost_model.prefill_cost if first_chunk else 0.0
        self.num_chunks += num_tokens > 1


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache_manager: BaseKVCacheManager,
        max_model_len: int,
        recompute_each_step: bool = False,
        step_sizes: Sequence[int] = (),
    ) -> None:
        self.config = config
        # Token counts a step's CUDA graph is captured at (mixed steps): a step pads up to the next one, so
        # dynamic sizing fills that padding with prompt tokens instead (their linear work is paid anyway).
        self.step_sizes = sorted(step_sizes)
        self.kv_cache_manager = kv_cache_manager
        self.max_model_len = max_model_len
        self.recompute_each_step = recompute_each_step  # M0: no KV cache, redo the whole sequence
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.held: dict[str, list[Request]] = {}  # copy-on-write siblings waiting for their leader's prefill
        self._finished_since_last_step: list[str] = []
        self.num_preemptions = 0
        self._static_batch_open = False  # static batching: still admitting (its members wait, undecoded)
        # Fed with every measured step when ``target_itl_ms`` is set; those steps also steer its tail factor.
        self.cost_model = StepCostModel(target=(config.target_itl_ms or 0.0) / 1e3)
        self.num_target_out_of_reach = 0  # prefill chunks sized by the token budget alone (``_target_out_of_reach``)
        self._back_to_back = False  # the previous step left requests running: no idle time before this one

    # ---- queue management -------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue ``request``; a priority that is no integer would break the queue's ordering, so it is refused."""
        if not isinstance(request.priority, int) or isinstance(request.priority, bool):
            raise InvalidTypeError(f"priority must be an integer, got {request.priority!r}")
        if request.request_id in self.requests:
            raise ValueError(f"request {request.request_id!r} is already in the scheduler")
        self.requests[request.request_id] = request
        if request.fork_from is not None and request.fork_from in self.requests:
            self.held.setdefault(request.fork_from, []).append(request)
            return
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        if self.config.policy == "priority":
            pos = next((i for i, r in enumerate(self.waiting) if request.sort_key() < r.sort_key()), len(self.waiting))
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
        step = _StepBudget(self.config.max_num_batched_tokens, *self._time_budget())
        if self.config.batching == "static":
            self._schedule_static(step)
        else:
            self._schedule_running(step)
            if not step.preempted:
                self._schedule_waiting(step)
        self._check_progress(step)
        out = SchedulerOutput(
            scheduled=[self._describe(req, n) for req, n in step.scheduled],
            preempted_req_ids=[r.request_id for r in step.preempted],
            finished_req_ids=self._finished_since_last_step,
            block_copies=self.kv_cache_manager.take_block_copies(),
        )
        self._finished_since_last_step = []
        for (req, n), sched in zip(step.scheduled, out.scheduled):
            req.num_computed_tokens += n  # counted as computed once scheduled (vLLM v1): the runner will
            if sched.sample:  # have computed them before anything reads this request again
                req.num_output_placeholders += 1
        return out

    def _num_new_tokens(self, req: Request) -> int:
        """Tokens ``req`` still has to run: known ones plus the one still being sampled (async scheduling).

        Zero when the tokens in flight will already finish it (``max_tokens`` or the context limit)."""
        pending = req.num_output_placeholders
        if pending and (req.num_output_tokens + pending >= req.max_tokens or req.num_tokens + pending >= self.max_model_len):
            return 0
        return req.num_tokens + pending - req.num_computed_tokens

    def _time_budget(self) -> tuple[float | None, StepCostModel | None]:
        """Dynamic chunk sizing: seconds a step may spend beyond its fixed cost, once the model is fitted."""
        if self.config.target_itl_ms is None or not self.cost_model.ready:
            return None, None
        return self.cost_model.aim - float(self.cost_model.coef[0]), self.cost_model

    def _chunk_size(self, req: Request, num_new: int, step: _StepBudget) -> int:
        """How many of ``req``'s ``num_new`` tokens this step runs (0: none).

        Without chunked prefill, all of them or none. With it, as many as the tokens
        left, ``long_prefill_token_threshold`` and, with ``target_itl_ms``, the time left allow."""
        cfg = self.config
        if not cfg.enable_chunked_prefill:
            return num_new if num_new <= step.tokens_left else 0
        if cfg.long_prefill_token_threshold:
            num_new = min(num_new, cfg.long_prefill_token_threshold)
        num_new = min(num_new, step.tokens_left)
        if step.time_left is not None and num_new > 1 and not self._target_out_of_reach():
            time_left = step.time_left - (0.0 if step.num_chunks else step.cost_model.prefill_cost)
            fits = step.cost_model.max_chunk(req.num_computed_tokens, time_left)
            num_new = min(num_new, self._padded(step, max(fits, 0 if step.num_chunks else MIN_DYNAMIC_CHUNK)))
        return num_new

    def _padded(self, step: _StepBudget, num_new: int) -> int:
        """``num_new`` grown to fill the captured size the step would pad up to with it (unchanged past the
        largest size, or without graphs): padded rows cost a token's linear work and carry nothing."""
        used = self.config.max_num_batched_tokens - step.tokens_left
        size = next((n for n in self.step_sizes if n >= used + num_new), None)
        return num_new if size is None else size - used

    def _target_out_of_reach(self) -> bool:
        """No step that carries a prefill can meet ``target_itl_ms``, whatever its chunk: the target is then
        given up for the token budget, since slicing prompts thinner would only make more such steps. Judged
        by the fit against the target, not the aim: a tail factor steered up by slow steps must not turn the
        target off and let whole-budget chunks in."""
        model = self.cost_model
        floor = float(model.coef[0]) + model.prefill_cost
        out = floor >= model.target
        if out and not self.num_target_out_of_reach:
            logger.warning(
                "target_itl_ms=%g is below what any step carrying a prompt costs here (%.1f ms by the fitted "
                "model): prompt chunks fall back to max_num_batched_tokens", self.config.target_itl_ms,
                floor * 1e3,
            )  # fmt: skip
        self.num_target_out_of_reach += out
        return out

    def _schedule_running(self, step: _StepBudget) -> None:
        """Decodes first, then the prompts still being prefilled (a long prompt never stalls a decode).

        When KV memory runs out, the last running request not yet scheduled in this step is preempted."""
        todo = [(req, self._num_new_tokens(req)) for req in self.running]
        for req, num_new in [t for t in todo if t[1] == 1] + [t for t in todo if t[1] > 1]:
            if req.status != RequestStatus.RUNNING:  # preempted for an earlier one
                continue
            num_new = self._chunk_size(req, num_new, step)
            if not num_new:
                continue
            while not self.kv_cache_manager.allocate_slots(req, num_new):
                victim = next(r for r in reversed(self.running) if r.request_id not in step.scheduled_ids)
                self._preempt(victim)
                step.preempted.append(victim)
                if victim is req:
                    break
            else:
                step.take(req, num_new)

    def _schedule_static(self, step: _StepBudget) -> None:
        """A static server: fill a batch (its members wait, undecoded, while the token budget spreads
        their prefills over steps), then decode it until every member has finished."""
        if not self.running:
            self._static_batch_open = True
        if self._static_batch_open and not self._schedule_waiting(step):
            self._static_batch_open = False  # full (seqs or memory) or nobody left to admit
        if not self._static_batch_open and not step.scheduled:
            self._schedule_running(step)

    def _schedule_waiting(self, step: _StepBudget) -> bool:
        """Admit waiting requests in queue order while the token budget, ``max_num_seqs`` and KV memory allow.

        Returns True when only this step's token budget stopped it (more can join next step)."""
        max_seqs = 1 if self.config.batching == "sequential" else self.config.max_num_seqs
        while self.waiting and len(self.running) < max_seqs:
            req = self.waiting[0]
            forked = self._try_fork(req)
            # region M6: prefix caching
            cached = None if forked else self._find_cached_prefix(req)
            # endregion
            wanted = self._num_new_tokens(req)
            num_new = self._chunk_size(req, wanted, step)
            over_budget = wanted > 0 and num_new == 0
            if (
                not num_new  # (0: no budget left, or its token in flight will finish it)
                or not self.kv_cache_manager.allocate_slots(req, num_new, cached)
            ):
                if forked:
                    self.kv_cache_manager.free(req)
                req.num_computed_tokens = 0
                return over_budget
            self.waiting.popleft()
            self.running.append(req)
            req.status = RequestStatus.RUNNING
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = time.perf_counter()
                req.num_cached_tokens = req.num_computed_tokens  # what a fork or a prefix hit saved it
            step.take(req, num_new)
        return False

    def _check_progress(self, step: _StepBudget) -> None:
        """A step that schedules nothing and frees nothing while work waits would repeat forever: fail instead.

        Admission refuses any request that cannot fit the whole KV cache alone, so this
        is a bug guard, not a policy: a lone request always runs.
        """
        if step.scheduled or step.preempted or not (self.waiting or self.running):
            return
        if any(r.num_output_placeholders for r in self.running):
            return  # async scheduling: tokens in flight will finish these (or free them) at the next update
        usage = self.kv_cache_manager.usage()
        head = self.waiting[0].request_id if self.waiting else None
        raise RuntimeError(
            f"scheduler stalled: {len(self.waiting)} waiting and {len(self.running)} running request(s), none "
            f"schedulable (KV blocks used {usage.num_used_blocks}/{usage.num_blocks}, token budget "
            f"{self.config.max_num_batched_tokens}, head of the queue {head!r})"
        )

    def _describe(self, req: Request, num_new: int) -> ScheduledRequest:
        """What the runner needs; a token still being sampled is left out of ``token_ids`` (the runner
        takes it from the previous step's output on the device)."""
        start = req.num_computed_tokens
        offset, new_blocks = self.kv_cache_manager.take_new_block_ids(req.request_id)
        return ScheduledRequest(
            req_id=req.request_id,
            token_ids=req.all_token_ids[start : start + num_new],
            num_tokens=num_new,
            start_pos=start,
            num_prompt_tokens=req.num_prompt_tokens,
            block_offset=offset,
            new_block_ids=new_blocks,
            sampling_params=req.sampling_params,
            sample=start + num_new == req.num_tokens + req.num_output_placeholders,
        )

    def _try_fork(self, req: Request) -> bool:
        """Copy-on-write: share the leader's prompt blocks, recompute only the last prompt token."""
        leader = self.requests.get(req.fork_from) if req.fork_from else None
        if (
            leader is None
            or leader.status != RequestStatus.RUNNING
            or req.num_computed_tokens
            or leader.num_computed_tokens < req.num_prompt_tokens
        ):
            return False
        req.num_computed_tokens = req.num_prompt_tokens - 1
        self.kv_cache_manager.fork(leader, req)
        return True

    # region M6: prefix caching
    def _find_cached_prefix(self, req: Request) -> list[KVCacheBlock]:
        """Start ``req`` after the longest run of its full blocks already cached (none when caching is off).

        A preempted request finds its own blocks again if nothing evicted them. Only a
        lookup: ``allocate_slots`` takes the blocks, or nothing happens if it fails.
        """
        blocks, num_cached = self.kv_cache_manager.get_computed_blocks(req)
        req.num_computed_tokens = num_cached
        return blocks

    # endregion

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
        if self.config.target_itl_ms is not None and runner_out.device_time is not None:
            seconds, measured_as = runner_out.device_time, "device"
            interval = runner_out.step_interval if self._back_to_back else None  # what running requests saw
            if interval is not None and interval > seconds:  # between tokens: the forward and any wait for the host
                seconds, measured_as = interval, "interval"
            shapes = [(s.num_tokens, s.start_pos + s.num_tokens) for s in sched_out.scheduled]
            self.cost_model.observe(shapes, seconds, measured_as)
        for sched, token, logprobs in zip(sched_out.scheduled, runner_out.sampled_token_ids, runner_out.logprobs):
            req = self.requests.get(sched.req_id)
            if req is None:  # finished or aborted while its step was in flight
                continue
            if req.status == RequestStatus.RUNNING and req.num_computed_tokens >= req.num_prompt_tokens:
                self._release_siblings(req)  # the leader's prompt is in the cache now
            if not sched.sample or token is None:
                continue
            req.num_output_placeholders -= 1
            req.append_output_token(token)
            if logprobs is not None:
                req.logprobs.append(logprobs)
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            req.metrics.last_token_time = now
            updated.append(req)
            status = self._check_stop(req, token)
            if status is not None:
                req.metrics.finished_time = now
                self.finish_request(req.request_id, status)
            elif self.recompute_each_step:
                req.num_computed_tokens = 0
        self._back_to_back = bool(self.running)  # an idle engine's wait is no step's cost
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
