"""The batched sampler: logits ``[B, V]`` -> one token per row, with no loop over requests.

Pipeline for random rows: temperature -> top-k -> top-p -> min-p -> softmax -> exponential
race. Greedy rows take the argmax of the raw logits. Filters set dropped logits to ``-inf``
so the softmax gives them probability 0. Every filter is a pure function so the book can
plot what each one leaves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from folovllm.sample.metadata import SamplingMetadata

_SAMPLING_EPS = 1e-5


@dataclass
class SamplerOutput:
    """One step's tokens; the logprob fields are ``None`` when no row asked for logprobs.

    ``logprobs`` is the sampled token's logprob under the *raw* model distribution
    (before temperature and filters), as vLLM v1 returns by default. ``topk_*`` hold the
    ``max_num_logprobs`` best raw alternatives of every row, best first; rows that asked
    for fewer are sliced by the caller.
    """

    sampled_token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32
    topk_token_ids: torch.Tensor | None  # [B, max_num_logprobs] int64
    topk_logprobs: torch.Tensor | None  # [B, max_num_logprobs] float32


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature; greedy rows (``< 1e-5``) are divided by 1.

    Dividing by 1 instead of 0 keeps a mixed batch free of ``inf``/``nan``; greedy rows
    never use the result.
    """
    temperature = torch.where(temperature < _SAMPLING_EPS, 1.0, temperature)
    return logits / temperature.unsqueeze(1)


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
    """Mask (to ``-inf``) what top-k and then top-p drop, sorting each row once.

    ``k`` ``[B]`` int: keep exactly the ``k`` largest logits; ``k <= 0`` or ``k >= V`` is
    off. ``p`` ``[B]`` float: of what top-k left, renormalized, keep the shortest prefix of
    the sorted distribution whose mass reaches ``p`` (a token stays if the mass strictly
    before it is ``< p``); the top token always stays, even for ``p <= 0``, and ``p >= 1``
    is off (so float rounding of the cumulative sum never trims the tail). Pass ``None``
    for a filter no row uses: with both ``None`` the logits come back untouched, unsorted.
    Ties are broken by the stable sort: the lower token id ranks first.
    """
    if k is None and p is None:
        return logits
    vocab_size = logits.shape[-1]
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True, stable=True)
    if k is not None:
        k = torch.where(k <= 0, vocab_size, k)
        ranks = torch.arange(vocab_size, device=logits.device)
        sorted_logits = sorted_logits.masked_fill(ranks.unsqueeze(0) >= k.unsqueeze(1), float("-inf"))
    if p is not None:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop = (mass_before >= p.unsqueeze(1)) & (p < 1.0).unsqueeze(1)
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_ids, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below ``min_p`` times the row's top probability.

    Compared in log space (``logit < max_logit + log(min_p)``), which needs no softmax and
    is unaffected by renormalization: ``min_p`` 0 keeps everything, 1 keeps only the
    tokens tied for the top.
    """
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Draw one token per row: ``argmax(probs / q)`` with ``q ~ Exp(1)`` i.i.d.

    This exponential race picks token ``i`` with probability ``probs[i]`` and needs no
    cumulative sum. Unseeded rows share one batched draw; each seeded row then redraws its
    ``q`` from its own generator (which must live on ``probs``' device), so its tokens do
    not depend on the other rows of the batch or their order.
    """
    q = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        q.exponential_()
    for row, generator in generators.items():
        q[row].exponential_(generator=generator)
    q.clamp_(min=torch.finfo(q.dtype).tiny)  # a zero draw would turn a masked 0/0 into nan
    return probs.div(q).argmax(dim=-1)


class Sampler(nn.Module):
    """Turn a step's logits into tokens (and raw logprobs) for the whole batch at once."""

    def forward(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != md.temperature.shape[0]:
            raise ValueError(f"logits must be [num_reqs={md.temperature.shape[0]}, vocab_size], got {tuple(logits.shape)}")
        logits = logits.float()
        sampled = self._sample(logits, md)
        if md.max_num_logprobs is None:
            return SamplerOutput(sampled, None, None, None)
        raw_logprobs = logits.log_softmax(dim=-1)
        topk_logprobs, topk_ids = raw_logprobs.topk(min(md.max_num_logprobs, logits.shape[-1]), dim=-1)
        return SamplerOutput(
            sampled_token_ids=sampled,
            logprobs=raw_logprobs.gather(1, sampled.unsqueeze(1)).squeeze(1),
            topk_token_ids=topk_ids,
            topk_logprobs=topk_logprobs,
        )

    @staticmethod
    def _sample(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """Greedy argmax and/or the filtered random draw, merged per row."""
        greedy = None if md.all_random else logits.argmax(dim=-1)
        if md.all_greedy:
            return greedy
        logits = apply_temperature(logits, md.temperature)
        logits = apply_top_k_top_p(logits, None if md.no_top_k else md.top_k, None if md.no_top_p else md.top_p)
        if not md.no_min_p:
            logits = apply_min_p(logits, md.min_p)
        random = random_sample(logits.softmax(dim=-1), md.generators)
        if greedy is None:
            return random
        return torch.where(md.temperature < _SAMPLING_EPS, greedy, random)
