"""The M4 FlashAttention backend: its row split, its kernels' calling conventions, its selection.

On CPU the FA2 kernel is replaced by a PyTorch reference with the same
contract (the backend takes it as ``kernel``), so the split between FA2 and
the Triton paged kernel (interpreted on CPU) is tested here; with CUDA the
real FA2 kernel runs against the naive backend.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

pytest.importorskip("triton")

from test_triton_attention import ATOL, DEVICE, make_batch  # noqa: E402

from folovllm import LLM, SamplingParams  # noqa: E402
from folovllm.attention.backends.abstract import AttentionSpec  # noqa: E402
from folovllm.attention.backends.flash_attn import FlashAttentionBackend, split_rows  # noqa: E402
from folovllm.attention.backends.naive import NaiveAttentionBackend  # noqa: E402
from folovllm.attention.layer import prefill_metadata  # noqa: E402
from folovllm.attention.selector import (  # noqa: E402
    flash_attention_unavailable,
    flash_varlen_kernel,
    package_flash_varlen,
    resolve_attention_backend,
    torch_flash_varlen,
)
from folovllm.config import EngineConfig  # noqa: E402

calls: list[tuple[int, int]] = []


def reference_varlen(q, k, v, cu_seqlens, max_seqlen, scale):
    """FA2's contract in plain PyTorch: causal attention of each ``cu_seqlens`` segment over itself."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    assert max_seqlen == max(lens) and sum(lens) == q.shape[0] == k.shape[0]
    calls.append((len(lens), q.shape[0]))
    return NaiveAttentionBackend().forward(q, k, v, None, prefill_metadata(lens, q.device), scale)


def run_flash_and_naive(q, k, v, cache, md, scale=0.3):
    calls.clear()
    cache_f, cache_n = cache.clone(), cache.clone()
    out_f = FlashAttentionBackend(kernel=reference_varlen).forward(q, k, v, cache_f, md, scale)
    out_n = NaiveAttentionBackend().forward(q, k, v, cache_n, md, scale)
    assert torch.equal(cache_f, cache_n)
    return out_f, out_n


@pytest.mark.parametrize(
    "q_lens, seq_lens, fa_calls",
    [
        ([5, 17, 9], [5, 17, 9], [(3, 31)]),  # fresh prefills only: one FA2 call over the whole batch
        ([1, 1, 1], [20, 9, 33], []),  # decode only: the paged kernel alone
        ([1, 5, 17, 1, 40], [20, 9, 17, 33, 40], [(2, 57)]),  # mixed: FA2 takes the two fresh prefills
    ],
)
def test_rows_split_between_fa2_and_the_paged_kernel_match_naive(q_lens, seq_lens, fa_calls):
    out_f, out_n = run_flash_and_naive(*make_batch(q_lens, seq_lens, 4, 2, 32, 8, seed=len(q_lens)))
    torch.testing.assert_close(out_f, out_n, atol=ATOL[torch.float32], rtol=0)
    assert calls == fa_calls


def test_split_is_built_once_per_step_and_reused_by_every_layer():
    q, k, v, cache, md = make_batch([1, 6], [12, 6], 4, 2, 32, 8)
    backend = FlashAttentionBackend(kernel=reference_varlen)
    split = backend.build(md, AttentionSpec.of(q, k))
    assert split.fresh_tokens == slice(1, 7) and split.cached_tokens == slice(0, 1)  # views, no gather
    assert split.cached.common.query_lens_cpu == [1] and split.cached.common.seq_lens_cpu == [12]
    first = backend.forward(q, k, v, cache.clone(), split, 0.3)
    assert torch.equal(backend.forward(q, k, v, cache.clone(), split, 0.3), first)
    assert torch.equal(backend.forward(q, k, v, cache.clone(), md, 0.3), first)  # plain metadata: built on the fly


def test_interleaved_rows_are_gathered_by_index():
    q, k, v, cache, md = make_batch([4, 1, 3, 1], [4, 9, 3, 12], 4, 2, 32, 8, seed=3)
    out_f, out_n = run_flash_and_naive(q, k, v, cache, md)
    torch.testing.assert_close(out_f, out_n, atol=ATOL[torch.float32], rtol=0)
    split = split_rows(md, AttentionSpec.of(q, k))
    assert split.fresh_tokens.tolist() == [0, 1, 2, 3, 5, 6, 7] and split.cached_tokens.tolist() == [4, 8]
    table = split.cached.common.block_table  # gathered, with the step table's row stride (one kernel variant)
    assert torch.equal(table, md.block_table[[1, 3]]) and table.stride(0) == md.block_table.stride(0)


def test_cached_rows_keep_the_block_tables_row_stride():
    """The engine's block table is a view of a persistent ``[max_seqs, max_blocks]`` buffer; a gathered copy
    would have the step's width as stride, and the paged kernel compiles a variant per stride divisibility."""
    from folovllm.attention.backends.flash_attn import rows_of

    persistent = torch.arange(4 * 48, dtype=torch.int32).view(4, 48)
    step = persistent[:, :5]  # stride 48, width 5
    assert rows_of(step, slice(1, 3)).data_ptr() == step[1].data_ptr()  # consecutive: a view
    for rows in ([1, 2], [0, 3], [2, 0]):
        got = rows_of(step, torch.tensor(rows))
        assert torch.equal(got, step[rows]) and got.stride() == (48, 1)


def test_cacheless_prefill_is_one_fa2_call_and_cached_rows_need_a_cache():
    q, k, v, cache, md = make_batch([3, 4], [3, 4], 4, 2, 32, 8)
    backend = FlashAttentionBackend(kernel=reference_varlen)
    calls.clear()
    out = backend.forward(q, k, v, None, prefill_metadata([3, 4], q.device), 0.3)
    assert calls == [(2, 7)]
    torch.testing.assert_close(out, NaiveAttentionBackend().forward(q, k, v, None, prefill_metadata([3, 4], q.device), 0.3))
    q, k, v, cache, md = make_batch([1], [5], 4, 2, 32, 8)
    with pytest.raises(ValueError, match="rows with a cached context need a kv_cache"):
        backend.forward(q, k, v, None, md, 0.3)
    md.slot_mapping = None
    with pytest.raises(ValueError, match="metadata.slot_mapping is required to store K/V in the cache"):
        backend.forward(q, k, v, cache, md, 0.3)


def test_official_package_is_preferred_and_called_causal(monkeypatch):
    seen = {}

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
        seen.update(cu_equal=torch.equal(cu_q, cu_k), max=(max_q, max_k), scale=softmax_scale, causal=causal)
        return q

    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func = flash_attn_varlen_func
    fake.__spec__ = types.SimpleNamespace(name="flash_attn")
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    assert flash_varlen_kernel() == ("flash_attn", package_flash_varlen)
    assert FlashAttentionBackend().kernel_name == "flash_attn"
    q = torch.zeros(5, 4, 8)
    package_flash_varlen(q, q[:, :2], q[:, :2], torch.tensor([0, 2, 5], dtype=torch.int32), 3, 0.5)
    assert seen == {"cu_equal": True, "max": (3, 3), "scale": 0.5, "causal": True}


def test_without_a_gpu_flash_attn_is_refused_and_auto_stays_naive():
    assert (
        flash_attention_unavailable(torch.device("cpu"), torch.bfloat16) == "FlashAttention-2 needs a CUDA device, got cpu"
    )
    if DEVICE.type == "cpu":
        with pytest.raises(
            ValueError, match="attention_backend='flash_attn' cannot run here: FlashAttention-2 needs a CUDA device, got cpu"
        ):
            LLM("random:tiny-llama", milestone="M4", attention_backend="flash_attn")
    assert resolve_attention_backend(EngineConfig.from_milestone("M4", device="cpu")) == "naive"


@pytest.mark.parametrize("milestone, expected", [("M3", "triton"), ("M4", "flash_attn"), (None, "flash_attn")])
def test_auto_picks_flash_attn_on_a_capable_gpu_from_m4_on(monkeypatch, milestone, expected):
    config = EngineConfig.from_milestone(milestone, device="cpu")
    config.model_config.device = torch.device("cuda")  # as if on a GPU; nothing runs
    monkeypatch.setattr("folovllm.attention.selector.flash_attention_unavailable", lambda device, dtype: None)
    assert resolve_attention_backend(config) == expected
    monkeypatch.setattr("folovllm.attention.selector.flash_attention_unavailable", lambda device, dtype: "old GPU")
    assert resolve_attention_backend(config) == "triton"


def test_engine_with_the_flash_backend_generates_what_m3_generates(tiny_checkpoint):
    """In fp32 on every device: on a GPU the default is bf16, where this random model's top two logits at one
    step (0.03 apart) swap between M3's kernels and M4's, so equal tokens would test rounding, not the split."""
    folder = str(tiny_checkpoint("qwen3"))
    fp32 = dict(max_model_len=64, block_size=4, kv_cache_memory=2**22, dtype="float32")
    prompts = [{"prompt_token_ids": [(5 * i + 3 * j) % 400 + 3 for j in range(n)]} for i, n in enumerate([4, 11, 7])]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    expected = [
        o.outputs[0].token_ids for o in LLM(folder, milestone="M3", **fp32).generate(prompts, params, use_tqdm=False)
    ]
    llm = LLM(folder, milestone="M4", max_num_seqs=2, **fp32)
    runner = llm.llm_engine.model_runner
    runner.backend = FlashAttentionBackend(kernel=reference_varlen)
    for layer in runner.model.attention_layers():
        layer.backend = runner.backend
    calls.clear()
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    assert calls, "fresh prefills went through the FA2 kernel"


@pytest.mark.skipif(flash_attention_unavailable(DEVICE, torch.bfloat16) is not None, reason="needs FA2 on CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_real_fa2_matches_naive_on_gpu(dtype):
    q_lens = [1, 1, 300, 1, 77, 1, 2048]
    seq_lens = [3000, 17, 300, 2049, 77, 1, 2048]
    q, k, v, cache, md = make_batch(q_lens, seq_lens, 32, 8, 128, 16, dtype=dtype)
    out_f = FlashAttentionBackend().forward(q, k, v, cache.clone(), md, 128**-0.5)
    out_n = NaiveAttentionBackend().forward(q, k, v, cache.clone(), md, 128**-0.5)
    torch.testing.assert_close(out_f.float(), out_n.float(), atol=ATOL[dtype], rtol=0)
    lens = [513, 1, 64]
    qq, kk, vv = (torch.randn(sum(lens), h, 128, device=DEVICE, dtype=dtype) for h in (32, 8, 8))
    md = prefill_metadata(lens, DEVICE)
    direct = torch_flash_varlen(qq, kk, vv, md.query_start_loc, max(lens), 0.1)
    torch.testing.assert_close(
        direct.float(), NaiveAttentionBackend().forward(qq, kk, vv, None, md, 0.1).float(), atol=ATOL[dtype], rtol=0
    )
    from torch.nn.attention.varlen import varlen_attn  # the public wrapper of the op we call: the same kernel

    cu = md.query_start_loc
    assert torch.equal(direct, varlen_attn(qq, kk, vv, cu, cu, max(lens), max(lens), scale=0.1, window_size=(-1, 0)))


def test_bench_prefill_payload_on_cpu():
    from folovllm.benchmarks.attention import bench_prefill_attention

    payload = bench_prefill_attention(
        [9, 20], num_prompts=2, num_heads=4, num_kv_heads=2, head_dim=16, dtype="float32", device="cpu"
    )
    assert payload["benchmark"] == "prefill_attention" and payload["milestone"] == "M4"
    assert [r["prompt_len"] for r in payload["results"]] == [9, 20]
    row = payload["results"][1]
    assert row["flops"] == 4 * 4 * 16 * 2 * 20 * 21 // 2
    assert row["naive"]["max_abs_diff"] == 0.0 and row["naive"]["TFLOPs"] > 0
    assert row["flash_attn"] == {"skipped": "FlashAttention-2 needs a CUDA device, got cpu"}
    with pytest.raises(ValueError, match="prompt_len must be a positive integer, got 0"):
        bench_prefill_attention([0], device="cpu")
