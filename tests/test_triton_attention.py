"""The Triton paged-attention backend against the naive reference.

Without CUDA the kernels run under Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set by ``conftest.py``); with CUDA the same tests run
the compiled kernels.
Shapes stay tiny because the interpreter executes every program in numpy.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton")


from folovllm.attention.backends.abstract import (  # noqa: E402
    AttentionMetadata,
    AttentionSpec,  # noqa: E402
    store_kv_reference,
)
from folovllm.attention.backends.naive import NaiveAttentionBackend  # noqa: E402
from folovllm.attention.backends.triton_paged import TritonPagedAttentionBackend  # noqa: E402
from folovllm.attention.ops.paged_attn import (  # noqa: E402
    SplitScratch,
    launch_paged_attention,
    paged_attention,
    plan_paged_attention,
    store_kv,
)
from folovllm.attention.ops.triton_paged_attn import _paged_attention_kernel  # noqa: E402
from folovllm.benchmarks.attention import bench_attention_sweep, bench_paged_decode  # noqa: E402
from folovllm.benchmarks.hardware import measure_copy_bandwidth, measure_matmul_tflops, median_time_s  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ATOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def make_batch(
    q_lens: list[int],
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: torch.device = DEVICE,
):
    """q/k/v for one step plus a cache whose blocks sit at shuffled physical indices.

    The cache starts full of random "stale" values, so reading a wrong block or a
    position past ``seq_len`` changes the result.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks) + 3
    physical = torch.randperm(num_blocks, generator=gen)
    block_table = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks):
        block_table[b, :n] = physical[used : used + n]
        used += n
    slots = [
        int(block_table[b, p // block_size]) * block_size + p % block_size
        for b, (n, s) in enumerate(zip(q_lens, seq_lens))
        for p in range(s - n, s)
    ]
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    md = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_table=block_table.to(device),
        slot_mapping=torch.tensor(slots, device=device),
        query_lens_cpu=list(q_lens),
        seq_lens_cpu=list(seq_lens),
        block_size=block_size,
    )

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    num_tokens = starts[-1]
    cache = rand(2, num_blocks, block_size, num_kv_heads, head_dim)
    return (
        rand(num_tokens, num_heads, head_dim) * 2,
        rand(num_tokens, num_kv_heads, head_dim),
        rand(num_tokens, num_kv_heads, head_dim),
        cache,
        md,
    )


def run_both(q, k, v, cache, md, scale=0.3):
    """Triton and naive outputs, each on its own copy of the cache (caches compared too)."""
    cache_t, cache_n = cache.clone(), cache.clone()
    out_t = TritonPagedAttentionBackend().forward(q, k, v, cache_t, md, scale)
    out_n = NaiveAttentionBackend().forward(q, k, v, cache_n, md, scale)
    assert torch.equal(cache_t, cache_n)
    return out_t, out_n


def test_store_kv_writes_exactly_the_mapped_slots():
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(2, 5, 4, 2, 16, generator=gen).to(DEVICE)
    qkv = torch.randn(6, 3, 2, 16, generator=gen).to(DEVICE)
    k, v = qkv[:, 1], qkv[:, 2]  # strided views, as the model's qkv split gives them
    slots = torch.tensor([7, -1, 0, 19, -1, 12], device=DEVICE)
    expected = cache.clone()
    keep = slots >= 0
    store_kv_reference(k[keep], v[keep], expected, slots[keep])
    store_kv(k, v, cache, slots)
    assert torch.equal(cache, expected)


def test_store_kv_rejects_bad_inputs():
    cache = torch.zeros(2, 4, 4, 2, 16, device=DEVICE)
    k = torch.zeros(3, 2, 16, device=DEVICE)
    slots = torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match="k dtype torch.float16 must match the kv_cache dtype"):
        store_kv(k.half(), k, cache, slots)
    with pytest.raises(ValueError, match=r"k and v must both be \[T, 2, 16\]"):
        store_kv(torch.zeros(3, 1, 16, device=DEVICE), k, cache, slots)
    with pytest.raises(ValueError, match=r"slot_mapping must have shape \(3,\)"):
        store_kv(k, k, cache, slots[:2])
    with pytest.raises(ValueError, match="kv_cache must be"):
        store_kv(k, k, cache[0], slots)


@pytest.mark.parametrize("num_heads, num_kv_heads", [(2, 2), (4, 2), (8, 2), (8, 1)])
def test_decode_matches_naive_across_gqa_ratios_and_block_edges(num_heads, num_kv_heads):
    seq_lens = [1, 15, 16, 17, 32, 33]
    out_t, out_n = run_both(*make_batch([1] * len(seq_lens), seq_lens, num_heads, num_kv_heads, 32, 16))
    torch.testing.assert_close(out_t, out_n, atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_mixed_decode_and_prefill_batch_matches_naive(block_size):
    # decode, chunked prefill with earlier context, fresh prefill, decode, long prefill
    q_lens, seq_lens = [1, 5, 17, 1, 40], [20, 9, 17, 33, 40]
    out_t, out_n = run_both(*make_batch(q_lens, seq_lens, 4, 2, 32, block_size, seed=block_size))
    torch.testing.assert_close(out_t, out_n, atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_naive(dtype):
    out_t, out_n = run_both(*make_batch([1, 6, 1], [16, 21, 7], 4, 2, 64, 16, dtype=dtype))
    assert out_t.dtype == dtype
    torch.testing.assert_close(out_t.float(), out_n.float(), atol=ATOL[dtype], rtol=0)


@st.composite
def ragged_batches(draw):
    """1-4 sequences, each a decode, a fresh prefill or a chunk after earlier context."""
    num_seqs = draw(st.integers(1, 4))
    q_lens = [draw(st.sampled_from([1, 1, 2, 9, 20])) for _ in range(num_seqs)]
    seq_lens = [n + draw(st.integers(0, 40)) for n in q_lens]
    group = draw(st.sampled_from([1, 2, 3, 4]))
    num_kv_heads = draw(st.sampled_from([1, 2]))
    return q_lens, seq_lens, group * num_kv_heads, num_kv_heads, draw(st.sampled_from([4, 8, 16]))


@settings(max_examples=8, deadline=None)
@given(batch=ragged_batches(), seed=st.integers(0, 100))
def test_random_ragged_batches_match_naive(batch, seed):
    q_lens, seq_lens, num_heads, num_kv_heads, block_size = batch
    out_t, out_n = run_both(*make_batch(q_lens, seq_lens, num_heads, num_kv_heads, 16, block_size, seed=seed))
    torch.testing.assert_close(out_t, out_n, atol=ATOL[torch.float32], rtol=0)


def test_head_dim_that_is_not_a_power_of_two_is_padded():
    out_t, out_n = run_both(*make_batch([1, 3], [18, 3], 4, 2, 40, 16))
    torch.testing.assert_close(out_t, out_n, atol=ATOL[torch.float32], rtol=0)


def test_split_k_gives_the_same_result():
    """The last split of each (sequence, KV head) merges in the same launch and leaves its counter at zero,
    so the next launch (a graph replay) merges again: same output twice, bit for bit."""
    q, k, v, cache, md = make_batch([1, 1, 4], [70, 5, 100], 4, 2, 32, 16)
    store_kv(k, v, cache, md.slot_mapping)
    whole = paged_attention(q, cache, md, 0.3, num_splits=1)
    for num_splits in (2, 3):
        split = paged_attention(q, cache, md, 0.3, num_splits=num_splits)
        torch.testing.assert_close(split, whole, atol=1e-5, rtol=0)
        assert torch.equal(paged_attention(q, cache, md, 0.3, num_splits=num_splits), split)


def test_split_k_on_chunks_spanning_several_query_tiles():
    """A chunk of 70 queries after 50 cached tokens spans three query tiles (the binary-search grid) beside two
    decode rows; cutting every context into 2 or 4 slices merges to the one-slice result, launch after launch."""
    q, k, v, cache, md = make_batch([1, 70, 1], [40, 120, 9], 4, 2, 32, 8, seed=5)
    store_kv(k, v, cache, md.slot_mapping)
    whole = paged_attention(q, cache, md, 0.3, num_splits=1)
    for num_splits in (2, 4):
        plan = plan_paged_attention(AttentionSpec(4, 2, 32, torch.float32), 8, DEVICE, 3, 70, 120, num_splits, 72)
        assert plan.search and plan.grid == (72 // plan.q_tile + 3, 2, num_splits)
        split = paged_attention(q, cache, md, 0.3, num_splits=num_splits)
        torch.testing.assert_close(split, whole, atol=1e-5, rtol=0)
        assert torch.equal(paged_attention(q, cache, md, 0.3, num_splits=num_splits), split)


def test_contexts_shorter_than_the_slice_floor_run_unsplit():
    """A plan's floor on slice length (the planner's 512 tokens; here 128) leaves a short context in one slice:
    that program stores its rows itself and the other splits exit, so the output equals the unsplit one bit for
    bit, while a longer context in the same launch is still split and merged; replays give the same output."""
    q, k, v, cache, md = make_batch([1, 40, 1, 1], [300, 100, 60, 520], 4, 2, 32, 8, seed=7)
    store_kv(k, v, cache, md.slot_mapping)
    whole = paged_attention(q, cache, md, 0.3, num_splits=1)
    spec = AttentionSpec(4, 2, 32, torch.float32)
    plan = plan_paged_attention(spec, 8, DEVICE, 4, 40, 520, 4, 43)
    assert plan.min_split == plan.block_n  # a forced count: slices of any length
    floored = dataclasses.replace(plan, min_split=2 * plan.block_n)
    assert plan_paged_attention(spec, 8, DEVICE, 4, 40, 520, num_tokens=43).min_split == 512  # the planner's floor
    outs = []
    for _ in range(2):
        scratch = SplitScratch.allocate(floored, 43, 4, DEVICE)
        out = launch_paged_attention(q, cache, floored, md.query_start_loc, md.seq_lens, md.block_table, 0.3, scratch)
        outs.append(out)
    short = torch.tensor([False, True, True, False]).repeat_interleave(torch.tensor([1, 40, 1, 1]))
    assert torch.equal(outs[0][short], whole[short])  # one slice: no partials, no merge
    torch.testing.assert_close(outs[0], whole, atol=1e-5, rtol=0)
    assert torch.equal(outs[1], outs[0])


@pytest.mark.parametrize(
    ("num_seqs", "max_query_len", "max_seq_len", "query_tiles", "expected"),
    [
        (4, 1, 8192, 0, 8),  # few decodes: filling the SMs twice over takes 9 slices, rounded down
        (256, 1, 8192, 0, 1),  # a full decode batch fills the GPU alone
        (4, 1, 600, 0, 1),  # no slice shorter than 512 tokens
        (41, 512, 9216, 16, 2),  # a 512-token chunk (16 tiles x 8 KV heads): two slices make 2 programs per SM
        (41, 512, 9216, 32, 1),  # the same chunk with 4 query heads per KV head (qwen3-8b): 2 per SM already
        (41, 256, 9216, 8, 4),  # a 256-token chunk: four slices
        (41, 2048, 9216, 64, 1),  # a 2048-token chunk fills the GPU alone
        (1, 64, 9216, 2, 16),  # a short chunk: capped at MAX_SPLITS
    ],
)
def test_split_count_follows_occupancy(monkeypatch, num_seqs, max_query_len, max_seq_len, query_tiles, expected):
    """On a GPU of 132 SMs (an H200) with 8 KV heads: decode batches by sequences, chunks by query tiles."""
    from folovllm.attention.ops import paged_attn

    monkeypatch.setattr(paged_attn, "_num_sms", lambda device: 132)
    cuda = torch.device("cuda")
    assert paged_attn.choose_num_splits(cuda, num_seqs, 8, max_query_len, max_seq_len, query_tiles) == expected
    assert paged_attn.choose_num_splits(torch.device("cpu"), num_seqs, 8, max_query_len, max_seq_len, query_tiles) == 1


def test_a_plan_for_larger_bounds_serves_a_padded_batch():
    """What a CUDA graph of a mixed step replays: a launch planned once for T tokens and S sequences
    runs a smaller batch; padding sequences have no query and no context, padding tokens no sequence."""
    q_lens, seq_lens = [1, 7, 1, 20], [30, 12, 5, 45]
    q, k, v, cache, md = make_batch(q_lens, seq_lens, 4, 2, 32, 8, seed=3)
    store_kv(k, v, cache, md.slot_mapping)
    expected = paged_attention(q, cache, md, 0.3)
    num_tokens, num_seqs, real = 64, 9, sum(q_lens)
    plan = plan_paged_attention(AttentionSpec(4, 2, 32, torch.float32), 8, DEVICE, num_seqs, num_tokens, 64,
                                num_tokens=num_tokens)  # fmt: skip
    assert plan.search and plan.grid[0] == num_tokens // plan.q_tile + num_seqs
    padded_q = torch.cat([q, torch.randn(num_tokens - real, 4, 32, device=DEVICE)])
    pad = num_seqs - len(q_lens)
    query_start_loc = torch.cat([md.query_start_loc, torch.full((pad,), real, dtype=torch.int32, device=DEVICE)])
    lens = torch.cat([md.seq_lens, torch.zeros(pad, dtype=torch.int32, device=DEVICE)])
    table = torch.cat([md.block_table, torch.zeros(pad, md.block_table.shape[1], dtype=torch.int32, device=DEVICE)])
    out = launch_paged_attention(padded_q, cache, plan, query_start_loc, lens, table, 0.3, None)
    assert torch.equal(out[:real], expected)


def test_nothing_outside_the_context_is_read():
    q, k, v, cache, md = make_batch([1, 3], [13, 20], 4, 2, 32, 8)
    store_kv(k, v, cache, md.slot_mapping)
    clean = paged_attention(q, cache, md, 0.3)
    poisoned = torch.full_like(cache, float("nan"))
    for b, seq_len in enumerate(md.seq_lens_cpu):
        for pos in range(seq_len):
            block, offset = int(md.block_table[b, pos // 8]), pos % 8
            poisoned[:, block, offset] = cache[:, block, offset]
    assert torch.equal(paged_attention(q, poisoned, md, 0.3), clean)


def test_backend_requires_a_cache_and_consistent_metadata():
    q, k, v, cache, md = make_batch([1, 2], [4, 2], 4, 2, 16, 8)
    backend = TritonPagedAttentionBackend()
    assert backend.name == "triton"
    with pytest.raises(ValueError, match="kv_cache is required by the triton backend"):
        backend.forward(q, k, v, None, md, 0.3)
    with pytest.raises(ValueError, match=r"q heads \(3\) must be a multiple of num_kv_heads \(2\)"):
        paged_attention(q[:, :3], cache, md, 0.3)
    with pytest.raises(ValueError, match="q has 2 tokens but metadata.query_lens_cpu sums to 3"):
        paged_attention(q[:2], cache, md, 0.3)
    md.block_size = 16
    with pytest.raises(ValueError, match=r"metadata.block_size \(16\) != kv_cache block size \(8\)"):
        paged_attention(q, cache, md, 0.3)


def test_bench_paged_decode_and_hardware_ceilings_on_cpu():
    result = bench_paged_decode(2, 20, 4, 2, 16, 8, torch.float32, "cpu", warmup=0, iters=1)
    assert result["kv_bytes_read"] == 2 * 2 * 20 * 2 * 16 * 4
    for key in ("time_us", "achieved_GBps", "naive_time_us", "naive_GBps", "speedup_vs_naive"):
        assert result[key] > 0, key
    assert result["max_abs_diff"] < 1e-5
    assert measure_copy_bandwidth("cpu", num_bytes=2**20) > 0
    assert measure_matmul_tflops("cpu", torch.float32, n=64) > 0
    with pytest.raises(ValueError, match="iters >= 1"):
        median_time_s(lambda: None, "cpu", iters=0)
    with pytest.raises(ValueError, match=r"num_heads \(5\) must be a multiple of num_kv_heads \(2\)"):
        bench_paged_decode(2, 20, 5, 2, 16, 8, torch.float32, "cpu")


def test_attention_sweep_payload_on_cpu():
    payload = bench_attention_sweep([1, 2], [9], 2, 1, 16, 8, "float32", "cpu")
    assert payload["benchmark"] == "attention" and payload["copy_GBps"] > 0
    assert [(r["num_seqs"], r["context_len"]) for r in payload["results"]] == [(1, 9), (2, 9)]
    assert all(r["fraction_of_copy_bw"] > 0 and r["num_splits"] == 1 for r in payload["results"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_realistic_shapes_on_gpu(dtype):
    q_lens = [1, 1, 1, 300, 1, 77, 1, 1]
    seq_lens = [3000, 17, 1024, 300, 2049, 600, 1, 512]
    out_t, out_n = run_both(*make_batch(q_lens, seq_lens, 32, 8, 128, 16, dtype=dtype))
    torch.testing.assert_close(out_t.float(), out_n.float(), atol=ATOL[dtype], rtol=0)
    q, k, v, cache, md = make_batch([1, 1], [16000, 9000], 32, 8, 128, 16, dtype=dtype, seed=1)
    out_t, out_n = run_both(q, k, v, cache, md)  # few long sequences: split-K is chosen
    torch.testing.assert_close(out_t.float(), out_n.float(), atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("group, block_size, width", [(2, 16, 1), (4, 4, 7)])
def test_warm_up_launches_every_variant_on_one_block(group, block_size, width):
    """Five split counts of the decode tiles, prefill tiles with and without search, each launched once with its own
    grid; the cache is only read."""
    from unittest import mock

    from folovllm.attention.ops import paged_attn

    spec = AttentionSpec(2 * group, 2, 16, torch.float32)
    cache = torch.randn(2, 3, block_size, 2, 16, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    before = cache.clone()
    with mock.patch.object(paged_attn, "launch_paged_attention", wraps=paged_attn.launch_paged_attention) as launch:
        assert paged_attn.warm_up_paged_attention(cache, spec, width) == 7
    variants = paged_attn.paged_attention_variants(spec, block_size, cache.device)
    assert [call.args[2] for call in launch.call_args_list] == [plan for plan, _ in variants]
    assert torch.equal(cache, before)


def test_split_kernels_compile_for_an_h200_on_this_cpu():
    """The split paths (one-slice exit, merge) built for compute capability 9.0 by Triton's own passes on the
    CPU, for a chunk plan and a decode plan: a kernel change that only the interpreter has run still has to
    compile for the GPU, within its shared memory."""
    from folovllm.triton_utils.offline_compile import compile_for_gpu

    types = {n: "*bf16" for n in ("Q", "KV_cache", "Out")} | {n: "*fp32" for n in ("Acc_part", "M_part", "L_part")}
    types |= {n: "*i32" for n in ("Counters", "block_table", "seq_lens", "query_start_loc")}
    types |= {"scale_log2": "fp32", "kv_stride": "i64"}
    types |= {n: "i32" for n in ("num_seqs", "min_split", "stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_bt")}
    for search, block_m, stages in ((True, 64, 2), (False, 16, 3)):
        constexprs = dict(NUM_KV_HEADS=8, GROUP=2, GROUP_PAD=2, Q_TILE=block_m // 2, BLOCK_M=block_m, BLOCK_N=64,
                          BLOCK_D=128, HEAD_DIM=128, BLOCK_SIZE=16, NUM_SPLITS=2, DOT_PRECISION="tf32",
                          SEARCH=search, PDL=search)  # fmt: skip
        asm = compile_for_gpu(_paged_attention_kernel, types, constexprs, num_warps=4, num_stages=stages)
        assert "atom.global" in asm["ptx"] and int(asm["shared"]) <= 228 * 1024
        assert ("griddepcontrol.launch_dependents" in asm["ptx"]) == search  # o_proj's early start, Hopper only
