"""``SamplingMetadata``: the per-request ``SamplingParams`` of one step, as batch tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from folovllm.sampling_params import SamplingParams
from folovllm.utils import to_device


@dataclass
class SamplingMetadata:
    """What the sampler needs for one step, one row per request in the batch.

    Built once per step so the sampler runs on whole tensors instead of looping over
    requests. Greedy rows keep ``temperature`` 0 and get neutral filters (``top_k`` 0,
    ``top_p`` 1, ``min_p`` 0), so the ``no_*`` flags only look at random rows and a
    greedy request never forces a sort. ``top_k`` 0 means "off".
    """

    temperature: torch.Tensor  # [B] float32, 0 for greedy rows
    top_k: torch.Tensor  # [B] int64, 0 = off
    top_p: torch.Tensor  # [B] float32
    min_p: torch.Tensor  # [B] float32
    all_greedy: bool
    all_random: bool
    no_top_k: bool
    no_top_p: bool
    no_min_p: bool
    generators: dict[int, torch.Generator]  # row -> generator of a seeded request
    max_num_logprobs: int | None  # None: no row asked for logprobs

    @classmethod
    def from_params(
        cls, params: list[SamplingParams], generators: dict[int, torch.Generator], device: torch.device | str
    ) -> "SamplingMetadata":
        """Stack the params of the batch's rows; ``generators`` maps row -> seeded generator."""
        bad_rows = [row for row in generators if not 0 <= row < len(params)]
        if bad_rows:
            raise ValueError(f"generators has rows {bad_rows} outside the batch of {len(params)}")
        random = [p for p in params if not p.greedy]
        asked = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=to_device([0.0 if p.greedy else float(p.temperature) for p in params], torch.float32, device),
            top_k=to_device([0 if p.greedy else p.top_k for p in params], torch.int64, device),
            top_p=to_device([1.0 if p.greedy else float(p.top_p) for p in params], torch.float32, device),
            min_p=to_device([0.0 if p.greedy else float(p.min_p) for p in params], torch.float32, device),
            all_greedy=not random,
            all_random=len(random) == len(params),
            no_top_k=all(p.top_k == 0 for p in random),
            no_top_p=all(p.top_p >= 1.0 for p in random),
            no_min_p=all(p.min_p == 0.0 for p in random),
            generators=dict(generators),
            max_num_logprobs=max(asked) if asked else None,
        )
