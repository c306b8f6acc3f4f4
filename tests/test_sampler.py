"""The batched sampler: exact filter supports, sampling frequencies, seeds and logprobs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from folovllm.sample import Sampler, SamplingMetadata, apply_min_p, apply_temperature, apply_top_k_top_p, random_sample
from folovllm.sampling_params import SamplingParams

# Sorted: id1 .40, id3 .25, id4 .15, id2 .10, id0 .05, id5 .05 (id0 ranks before id5 on the tie).
PROBS = [0.05, 0.40, 0.10, 0.25, 0.15, 0.05]
LOGITS = torch.tensor([PROBS]).log()
ALL = {0, 1, 2, 3, 4, 5}
# chi2.ppf(1 - 1e-4, df) for df = 1..7: reject a correct sampler with probability 1e-4.
CHI2_CRITICAL = {1: 15.137, 2: 18.421, 3: 21.108, 4: 23.513, 5: 25.745, 6: 27.856, 7: 29.878}
NUM_DRAWS = 20_000


def _md(params: list[SamplingParams], generators: dict[int, torch.Generator] | None = None) -> SamplingMetadata:
    return SamplingMetadata.from_params(params, generators or {}, "cpu")


def _filter(logits: torch.Tensor, temperature: float = 1.0, k: int = 0, p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """The sampler's random-row pipeline, through the public filter functions."""
    rows = logits.shape[0]
    out = apply_temperature(logits, torch.full((rows,), temperature))
    out = apply_top_k_top_p(out, torch.full((rows,), k), torch.full((rows,), p))
    return apply_min_p(out, torch.full((rows,), min_p))


def _support(logits: torch.Tensor, **kw) -> set[int]:
    return set(torch.isfinite(_filter(logits, **kw)[0]).nonzero().flatten().tolist())


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "kw, expected",
    [
        ({}, ALL),
        ({"k": 1}, {1}),
        ({"k": 3}, {1, 3, 4}),
        ({"k": 5}, {1, 3, 4, 2, 0}),  # tie at .05: stable sort keeps the lower id
        ({"k": 6}, ALL),
        ({"k": 100}, ALL),
        ({"p": 1.0}, ALL),
        ({"p": 0.97}, ALL),
        ({"p": 0.93}, {1, 3, 4, 2, 0}),
        ({"p": 0.7}, {1, 3, 4}),
        ({"p": 0.5}, {1, 3}),
        ({"p": 0.3}, {1}),
        ({"p": 0.01}, {1}),  # the top token always stays
        ({"min_p": 0.1}, ALL),
        ({"min_p": 0.3}, {1, 3, 4}),
        ({"min_p": 0.5}, {1, 3}),
        ({"min_p": 1.0}, {1}),
        # top-p sees top-k's renormalized mass (.5, .3125, .1875): mass before id4 is .8125 >= .7.
        ({"k": 3, "p": 0.7}, {1, 3}),
        ({"k": 4, "min_p": 0.3}, {1, 3, 4}),
        ({"p": 0.93, "min_p": 0.2}, {1, 3, 4, 2}),
        ({"k": 5, "p": 0.97, "min_p": 0.3}, {1, 3, 4}),
        ({"k": 1, "p": 0.01, "min_p": 1.0}, {1}),
    ],
)
def test_filters_keep_exact_support(kw: dict, expected: set[int]) -> None:
    assert _support(LOGITS, **kw) == expected


def test_filters_on_ties() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 1.0]])
    assert _support(logits, k=2) == {1, 2}
    assert _support(logits, k=4) == {1, 2, 4, 3}
    assert _support(logits, min_p=1.0) == {1, 2, 4}
    assert _support(logits, p=0.01) == {1}
    # Uniform quarters are exact in float32: the mass before id2 is exactly p, so id2 goes.
    assert _support(torch.zeros(1, 4), p=0.5) == {0, 1}


def test_top_p_edges() -> None:
    assert _support(LOGITS, p=0.0) == {1}
    # id1's probability underflows to 0, so the mass before it is 1.0: p == 1 must still keep it.
    assert _support(torch.tensor([[0.0, -200.0]]), p=1.0) == {0, 1}
    assert _support(torch.tensor([[0.0, -200.0]]), p=0.999) == {0}


def test_filters_are_per_row() -> None:
    logits = LOGITS.repeat(3, 1)
    out = apply_top_k_top_p(logits, torch.tensor([1, 0, 3]), torch.tensor([1.0, 0.5, 1.0]))
    out = apply_min_p(out, torch.tensor([0.0, 0.0, 0.5]))
    kept = [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in out]
    assert kept == [{1}, {1, 3}, {1, 3}]
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])


def test_no_filter_fast_path_returns_logits_untouched() -> None:
    assert apply_top_k_top_p(LOGITS, None, None) is LOGITS
    md = _md([SamplingParams(temperature=0.0, top_k=3, top_p=0.5, min_p=0.2), SamplingParams()])
    assert (md.no_top_k, md.no_top_p, md.no_min_p) == (True, True, True)


def _chi2(counts: torch.Tensor, probs: list[float]) -> float:
    n = counts.sum().item()
    return sum((c - n * q) ** 2 / (n * q) for c, q in zip(counts.tolist(), probs))


def _draw(logits: torch.Tensor, params: SamplingParams, n: int = NUM_DRAWS) -> torch.Tensor:
    """Token counts of ``n`` draws made as one batched call of ``n`` identical rows."""
    torch.manual_seed(1234)
    out = Sampler()(logits.repeat(n, 1), _md([params] * n))
    return torch.bincount(out.sampled_token_ids, minlength=logits.shape[-1])


@pytest.mark.parametrize(
    "temperature, k, p, min_p, support",
    [
        (1.0, 0, 1.0, 0.0, ALL),
        (0.7, 4, 1.0, 0.0, {1, 3, 4, 2}),
        (1.3, 0, 0.8, 0.0, {1, 3, 4, 2}),
        (1.0, 0, 1.0, 0.3, {1, 3, 4}),
        (2.0, 5, 0.9, 0.1, {1, 3, 4, 2, 0}),
        (0.5, 0, 0.8, 0.0, {1, 3}),
    ],
)
def test_frequencies_match_filtered_distribution(
    temperature: float, k: int, p: float, min_p: float, support: set[int]
) -> None:
    params = SamplingParams(temperature=temperature, top_k=k, top_p=p, min_p=min_p)
    assert _support(LOGITS, temperature=temperature, k=k, p=p, min_p=min_p) == support
    counts = _draw(LOGITS, params)
    assert set(counts.nonzero().flatten().tolist()) == support
    ids = sorted(support)
    weights = [PROBS[i] ** (1.0 / temperature) for i in ids]
    expected = [w / sum(weights) for w in weights]
    assert _chi2(counts[ids], expected) < CHI2_CRITICAL[len(ids) - 1]


def test_chi_square_rejects_a_wrong_distribution() -> None:
    counts = _draw(LOGITS, SamplingParams(temperature=0.7))
    assert _chi2(counts, PROBS) > CHI2_CRITICAL[len(PROBS) - 1]


def test_greedy_equals_argmax() -> None:
    logits = torch.randn(16, 100, generator=_gen(0))
    params = [SamplingParams(temperature=0.0, top_k=5, seed=3)] * 16
    out = Sampler()(logits, _md(params, {0: _gen(3)}))
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))
    assert out.logprobs is None and out.topk_token_ids is None and out.topk_logprobs is None


def test_mixed_greedy_and_random_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(64, 1000, generator=_gen(1)) * 0.01
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.5) for i in range(64)]
    md = _md(params)
    assert not md.all_greedy and not md.all_random
    sampled = Sampler()(logits, md).sampled_token_ids
    assert torch.equal(sampled[0::2], logits[0::2].argmax(dim=-1))
    assert (sampled[1::2] != logits[1::2].argmax(dim=-1)).sum() >= 30


def test_bf16_logits_are_upcast() -> None:
    logits = torch.randn(8, 50, generator=_gen(2)).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.0, logprobs=2)] * 4 + [SamplingParams(temperature=0.8, top_p=0.9)] * 4
    out = Sampler()(logits, _md(params))
    assert out.logprobs.dtype == torch.float32 and out.sampled_token_ids.dtype == torch.int64
    assert torch.equal(out.sampled_token_ids[:4], logits[:4].float().argmax(dim=-1))


def _run_steps(logits: torch.Tensor, params: list[SamplingParams], seeds: dict[int, int], steps: int = 10) -> torch.Tensor:
    """``steps`` sampler calls of one batch, each seeded row with its own live generator."""
    generators = {row: _gen(seed) for row, seed in seeds.items()}
    md = _md(params, generators)
    return torch.stack([Sampler()(logits, md).sampled_token_ids for _ in range(steps)], dim=1)


def test_seeded_row_is_independent_of_batch_and_order() -> None:
    row = torch.zeros(1, 500)
    others = torch.randn(3, 500, generator=_gen(5))
    seeded = SamplingParams(temperature=1.0, seed=42)
    alone = _run_steps(row, [seeded], {0: 42})[0]
    torch.manual_seed(0)
    batch = torch.cat([others[:2], row, others[2:]])
    params = [SamplingParams(), SamplingParams(temperature=0.0), seeded, SamplingParams(seed=7, top_k=9)]
    in_batch = _run_steps(batch, params, {2: 42, 3: 7})[2]
    torch.manual_seed(99)
    reordered = _run_steps(torch.cat([row, others.flip(0)]), [seeded] + params[::-1][:3], {0: 42})[0]
    assert torch.equal(alone, in_batch) and torch.equal(alone, reordered)
    assert torch.equal(alone, _run_steps(row, [seeded], {0: 42})[0])
    assert not torch.equal(alone, _run_steps(row, [seeded], {0: 43})[0])


def test_seeded_rows_with_filters_reproduce() -> None:
    logits = torch.randn(2, 300, generator=_gen(6))
    params = [SamplingParams(temperature=0.9, top_k=40, top_p=0.9, min_p=0.01, seed=s) for s in (1, 2)]
    first = _run_steps(logits, params, {0: 1, 1: 2})
    assert torch.equal(first, _run_steps(logits, params, {0: 1, 1: 2}))
    assert torch.equal(first[1], _run_steps(logits[1:], params[1:], {0: 2})[0])


def test_random_sample_uses_only_the_row_generator() -> None:
    probs = torch.full((2, 100), 0.01)
    torch.manual_seed(0)
    a = random_sample(probs, {1: _gen(11)})
    torch.manual_seed(1)
    b = random_sample(probs, {1: _gen(11)})
    assert a[1] == b[1]
    assert random_sample(probs[1:], {0: _gen(11)})[0] == a[1]


def _entropy(counts: torch.Tensor) -> float:
    freqs = counts.double() / counts.sum()
    return -(freqs[freqs > 0] * freqs[freqs > 0].log()).sum().item()


def test_temperature_orders_entropy() -> None:
    entropies = [_entropy(_draw(LOGITS, SamplingParams(temperature=t))) for t in (0.5, 1.0, 2.0)]
    assert entropies[0] < entropies[1] < entropies[2]
    assert _draw(LOGITS, SamplingParams(temperature=0.01), n=1000).tolist() == [0, 1000, 0, 0, 0, 0]


def test_logprobs_are_raw_log_softmax_of_sampled_token() -> None:
    logits = torch.randn(6, 40, generator=_gen(3)).to(torch.bfloat16)
    params = [
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=0.5, logprobs=1),
        SamplingParams(top_k=3, logprobs=5),
        SamplingParams(top_p=0.3),
        SamplingParams(min_p=0.5, logprobs=2),
        SamplingParams(temperature=3.0, seed=1),
    ]
    torch.manual_seed(0)
    out = Sampler()(logits, _md(params, {5: _gen(1)}))
    ref = logits.float().log_softmax(dim=-1)
    assert torch.allclose(out.logprobs, ref.gather(1, out.sampled_token_ids.unsqueeze(1)).squeeze(1))
    assert out.topk_token_ids.shape == out.topk_logprobs.shape == (6, 5)
    ref_values, ref_ids = ref.sort(dim=-1, descending=True)
    assert torch.equal(out.topk_token_ids, ref_ids[:, :5])
    assert torch.allclose(out.topk_logprobs, ref_values[:, :5])
    assert (out.topk_logprobs[:, :-1] >= out.topk_logprobs[:, 1:]).all()
    assert torch.allclose(out.topk_logprobs, ref.gather(1, out.topk_token_ids))


def test_logprobs_zero_and_more_than_vocab() -> None:
    logits = torch.randn(2, 4, generator=_gen(4))
    out = Sampler()(logits, _md([SamplingParams(temperature=0.0, logprobs=0)] * 2))
    assert out.topk_token_ids.shape == (2, 0) and out.logprobs.shape == (2,)
    out = Sampler()(logits, _md([SamplingParams(temperature=0.0, logprobs=10), SamplingParams(temperature=0.0)]))
    assert out.topk_token_ids.shape == (2, 4)
    assert sorted(out.topk_token_ids[0].tolist()) == [0, 1, 2, 3]


def test_metadata_from_params() -> None:
    params = [
        SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.3, logprobs=4),
        SamplingParams(temperature=0.7, top_k=-1, logprobs=2),
        SamplingParams(top_p=0.9, min_p=0.1),
    ]
    md = _md(params, {2: _gen(0)})
    assert md.temperature.tolist() == pytest.approx([0.0, 0.7, 1.0])
    assert md.top_k.tolist() == [0, 0, 0] and md.top_k.dtype == torch.int64
    assert md.top_p.tolist() == pytest.approx([1.0, 1.0, 0.9]) and md.top_p.dtype == torch.float32
    assert md.min_p.tolist() == pytest.approx([0.0, 0.0, 0.1])
    assert (md.all_greedy, md.all_random, md.no_top_k, md.no_top_p, md.no_min_p) == (False, False, True, False, False)
    assert md.max_num_logprobs == 4 and list(md.generators) == [2]
    assert _md([SamplingParams()]).all_random and _md([SamplingParams(temperature=0.0)]).all_greedy
    assert _md([SamplingParams()]).max_num_logprobs is None


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match=r"^generators has rows \[3\] outside the batch of 2$"):
        _md([SamplingParams()] * 2, {3: _gen(0)})
    with pytest.raises(ValueError, match=r"^logits must be \[num_reqs=2, vocab_size\], got \(3, 10\)$"):
        Sampler()(torch.zeros(3, 10), _md([SamplingParams()] * 2))


_logit = st.one_of(st.floats(-8.0, 8.0, width=32), st.sampled_from([0.0, 1.0, 2.5]))


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_sampled_token_lies_in_kept_support(data: st.DataObject) -> None:
    vocab = data.draw(st.integers(1, 40), label="vocab")
    logits = torch.tensor([data.draw(st.lists(_logit, min_size=vocab, max_size=vocab), label="logits")])
    temperature = data.draw(st.floats(0.05, 3.0), label="temperature")
    k = data.draw(st.integers(0, vocab + 3), label="k")
    p = data.draw(st.floats(0.01, 1.0), label="p")
    min_p = data.draw(st.floats(0.0, 1.0), label="min_p")
    filtered = _filter(logits, temperature, k, p, min_p)[0]
    kept = torch.isfinite(filtered)
    tempered = logits[0] / temperature
    assert kept[tempered.argmax()]
    if k:
        assert kept.sum() <= k
    if not kept.all():
        assert tempered[kept].min() >= tempered[~kept].max()
    if min_p == 0.0 and p < 1.0:
        probs = _filter(logits, temperature, k)[0].softmax(dim=-1)
        mass = probs[kept].sum().item()
        assert mass >= p - 1e-4
        assert mass - probs[kept].min().item() < p + 1e-4
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    params = SamplingParams(temperature=temperature, top_k=k, top_p=p, min_p=min_p)
    sampled = Sampler()(logits.repeat(64, 1), _md([params] * 64)).sampled_token_ids
    assert kept[sampled].all()
