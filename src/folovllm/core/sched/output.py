"""The plain data the scheduler hands the model runner each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from folovllm.sampling_params import SamplingParams


@dataclass
class ScheduledRequest:
    """One request's share of a step: feed ``token_ids`` at positions ``start_pos ..``.

    The block table travels as a change, not a copy: the request's table is
    its previous table up to ``block_offset``, then ``new_block_ids``. A request
    the runner has not seen (or that was preempted) comes with offset 0 and its
    whole table; a decode step usually brings no new block at all.
    """

    req_id: str
    token_ids: list[int]  # may lack its last token when that one is still being sampled (async scheduling)
    num_tokens: int
    start_pos: int
    num_prompt_tokens: int
    block_offset: int
    new_block_ids: list[int]
    sampling_params: SamplingParams
    sample: bool  # True when this step computes the request's last known token

    @property
    def is_prefill(self) -> bool:
        """Anything but a decode (the one token sampled last step): prompt tokens, or a recompute."""
        return self.num_tokens > 1 or self.start_pos < self.num_prompt_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_req_ids: list[str] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)  # since the last step
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write, before the forward

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
