"""CUDA graphs: padded decode batches (M4), padded mixed steps (M5), capture-time metadata, fused kernels,
bounded state.

A CUDA graph cannot be captured on CPU, so the CPU tests replay "graphs" eagerly: the
same persistent buffers, the same padding rows, the same metadata planned once per size
for any context length. That is everything a real replay depends on besides the driver;
on a GPU the last tests capture real graphs and compare tokens with eager mode.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from folovllm import LLM, SamplingParams  # noqa: E402
from folovllm.model_executor.layers.custom_op import enable_fused_ops  # noqa: E402
from folovllm.worker.cuda_graph import CUDAGraphRunner, capture_sizes, mixed_capture_sizes  # noqa: E402

CUDA = torch.cuda.is_available()


class EagerReplay(CUDAGraphRunner):
    """A graph runner whose "capture" keeps the per-size metadata and whose "replay" runs the forward."""

    replays: list[int]

    def capture(self, sizes=None, pool=None) -> None:
        self.replays = []
        for size in sizes or self.sizes:
            self.pad_inputs(size)
            self.graphs[size] = self._capture_metadata(size)

    def replay(self, size: int) -> torch.Tensor:
        self.replays.append(size)
        return self._forward(size, self.graphs[size])


def test_capture_sizes_ladder_and_padding():
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(256)[:5] == [1, 2, 4, 8, 16] and capture_sizes(256)[-1] == 256
    assert capture_sizes(6, [4, 1, 64]) == [1, 4, 6]
    runner = CUDAGraphRunner([1, 2, 4, 8], None, None, None, torch.device("cpu"))
    assert [runner.padded_size(n) for n in (1, 3, 5, 8, 9)] == [1, 4, 8, 8, None]
    assert mixed_capture_sizes(2048)[:4] == [16, 32, 64, 128] and mixed_capture_sizes(2048)[-3:] == [1536, 1792, 2048]
    assert mixed_capture_sizes(600) == [16, 32, 64, 128, 192, 256, 320, 384, 448, 512, 600]


def prompts(n: int) -> list[dict]:
    return [{"prompt_token_ids": [(7 * i + 3 * j) % 500 + 3 for j in range(4 + 3 * i)]} for i in range(n)]


def generate(llm: LLM, n: int = 5) -> list[list[int]]:
    params = [SamplingParams(temperature=0.0, max_tokens=6 + 2 * i, ignore_eos=True) for i in range(n)]
    return [o.outputs[0].token_ids for o in llm.generate(prompts(n), params, use_tqdm=False)]


def tiny(milestone: str = "M4", **kw) -> LLM:
    return LLM(
        "random:tiny-qwen3",
        milestone=milestone,
        device="cpu",
        dtype="float32",
        max_model_len=64,
        block_size=4,
        kv_cache_memory=2**21,
        **{"max_num_seqs": 8, **kw},
    )


@pytest.mark.parametrize("fused", [False, True])
def test_padded_replays_generate_what_eager_steps_generate(fused):
    expected = generate(tiny("M3", attention_backend="triton"))
    llm = tiny(attention_backend="triton")
    runner = llm.llm_engine.model_runner
    if fused:
        enable_fused_ops(runner.model)
    runner.cuda_graphs = EagerReplay(
        [1, 2, 4, 8], runner._graph_forward, runner._graph_metadata, runner._pad_decode_inputs, runner.device
    )
    runner.cuda_graphs.capture()
    assert generate(llm) == expected
    replays = runner.cuda_graphs.replays
    assert replays and set(replays) <= {1, 2, 4, 8} and 8 in replays  # 5 running sequences pad to 8


def test_capture_metadata_is_planned_for_any_context():
    llm = tiny(attention_backend="triton")
    runner = llm.llm_engine.model_runner
    md = runner._graph_metadata(4)
    assert md.common.block_table.shape == (4, runner.max_blocks_per_req)  # full width: any context fits
    assert md.plan.grid == (4, 2, 1)  # 4 sequences x 2 KV heads, no split-K on CPU
    mixed = runner._mixed_graph_metadata(64)  # 64 tokens in up to max_num_seqs=8 sequences
    assert mixed.common.num_seqs == 8 and mixed.common.slot_mapping.shape == (64,) and mixed.plan.search
    assert mixed.plan.grid == (64 // mixed.plan.q_tile + 8, 2, 1)


def test_padded_mixed_replays_generate_what_eager_steps_generate():
    """M5 with every step replayed: chunks of long prompts beside decodes, padded to token-count sizes."""
    n = 6
    params = [SamplingParams(temperature=0.0, max_tokens=6 + 2 * i, ignore_eos=True) for i in range(n)]

    def run(llm: LLM) -> list[list[int]]:
        return [o.outputs[0].token_ids for o in llm.generate(prompts(n), params, use_tqdm=False)]

    expected = run(tiny("M3", attention_backend="triton"))
    llm = tiny("M5", attention_backend="triton", max_num_batched_tokens=12)
    runner = llm.llm_engine.model_runner
    runner.cuda_graphs = EagerReplay(
        [1, 2, 4, 8], runner._graph_forward, runner._graph_metadata, runner._pad_decode_inputs, runner.device
    )
    runner.mixed_graphs = EagerReplay(
        [5, 10, 12], runner._graph_forward, runner._mixed_graph_metadata, runner._pad_mixed_inputs, runner.device
    )
    for graphs in (runner.cuda_graphs, runner.mixed_graphs):
        graphs.capture()
    assert run(llm) == expected
    mixed = runner.mixed_graphs.replays
    assert runner.cuda_graphs.replays and set(mixed) <= {5, 10, 12} and 12 in mixed  # 12: full budget steps


def replaying(llm: LLM, mixed_sizes: list[int]) -> tuple[EagerReplay, EagerReplay]:
    """Give ``llm``'s runner eagerly replayed decode graphs (1, 2, 4) and mixed graphs of ``mixed_sizes`` tokens."""
    runner = llm.llm_engine.model_runner
    runner.cuda_graphs = EagerReplay(
        [1, 2, 4], runner._graph_forward, runner._graph_metadata, runner._pad_decode_inputs, runner.device
    )
    runner.mixed_graphs = EagerReplay(
        mixed_sizes, runner._graph_forward, runner._mixed_graph_metadata, runner._pad_mixed_inputs, runner.device
    )
    for graphs in (runner.cuda_graphs, runner.mixed_graphs):
        graphs.capture()
    return runner.cuda_graphs, runner.mixed_graphs


@settings(max_examples=4, deadline=None)
@given(
    budget=st.sampled_from([8, 13, 16]),
    lens=st.lists(st.integers(5, 30), min_size=2, max_size=6),
    shared=st.integers(0, 12),
    seed=st.integers(0, 50),
)
def test_padded_mixed_steps_under_every_m6_feature(budget, lens, shared, seed):
    """M6 (chunked prefill, prefix caching, async scheduling) with every step replayed from padded graphs,
    on random prompts that share a prefix, at most 4 sequences a step: M3's greedy tokens."""
    head = [(seed * 7 + j) % 400 + 3 for j in range(shared)]
    prompts = [
        {"prompt_token_ids": head + [(seed + 13 * i + 5 * j) % 400 + 3 for j in range(n)]} for i, n in enumerate(lens)
    ]
    params = [SamplingParams(temperature=0.0, max_tokens=3 + i % 4, ignore_eos=True) for i in range(len(lens))]

    def run(llm: LLM) -> list[list[int]]:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    kw = dict(attention_backend="triton", max_num_seqs=4)
    expected = run(tiny("M3", **kw))
    llm = tiny("M6", max_num_batched_tokens=budget, **kw)
    mixed_sizes = sorted({4, budget // 2, budget})
    decode, mixed = replaying(llm, mixed_sizes)
    assert run(llm) == expected
    assert mixed.replays and set(mixed.replays) <= set(mixed_sizes)


def test_long_run_keeps_engine_state_bounded(monkeypatch):
    """A thousand steps leave nothing behind: no per-step record (stats off), no request, block or row."""
    import folovllm.engine.llm_engine as llm_engine

    monkeypatch.setattr(llm_engine, "STEP_STATS_LIMIT", 50)
    for collect in (False, True):
        llm = tiny("M3", collect_step_stats=collect)
        engine = llm.llm_engine
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        for _ in range(25):  # 25 rounds x ~40 steps
            llm.generate(prompts(3), params, use_tqdm=False)
        assert engine.stats.num_steps >= 1000
        assert len(engine.step_stats) == (50 if collect else 0)
        sched, runner = engine.scheduler, engine.model_runner
        assert not engine.parents and not sched.requests and not sched.running and not sched.waiting
        assert engine.kv_cache_manager.block_pool.num_free_blocks == engine.kv_cache_manager.num_blocks
        assert not engine.kv_cache_manager.req_to_blocks and not engine.kv_cache_manager.num_tokens
        engine.step()  # an empty step tells the runner about the last finished requests
        assert not runner.block_tables.row_of and not runner.generators


@pytest.mark.skipif(not CUDA, reason="captures real CUDA graphs")
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3", "qwen3-0.6b"])
def test_cuda_graph_tokens_equal_eager_tokens_on_gpu(preset):
    def run(**kw):
        llm = LLM(f"random:{preset}", milestone="M4", max_model_len=256, kv_cache_memory=2**28, max_num_seqs=16, **kw)
        n = 11  # 11, 10, ... running sequences: most decode steps need padding
        params = [SamplingParams(temperature=0.0, max_tokens=8 + 3 * i, ignore_eos=True) for i in range(n)]
        outs = llm.generate(prompts(n), params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], llm.llm_engine.model_runner

    eager, _ = run(enforce_eager=True)
    graphed, runner = run()
    graphs = runner.cuda_graphs
    # (a tiny model's graphs may fit memory the allocator already holds: 0 bytes is a fair reading)
    assert graphs is not None and sorted(graphs.graphs) == graphs.sizes and graphs.memory_bytes >= 0
    assert graphed == eager
    assert runner.mixed_graphs is None  # M4 captures decode steps only


@pytest.mark.skipif(not CUDA, reason="captures real CUDA graphs")
@pytest.mark.parametrize("preset", ["tiny-qwen3", "qwen3-0.6b"])
def test_mixed_cuda_graph_tokens_equal_eager_tokens_on_gpu(preset):
    """M5 with a 64-token budget: prompt chunks and decodes share steps, every step replays a graph.

    Both runs use the Triton backend: eager FA2 rows would round differently in bf16 from the
    paged kernel every replayed step runs on."""
    n = 11
    params = [SamplingParams(temperature=0.0, max_tokens=8 + 3 * i, ignore_eos=True) for i in range(n)]
    long_prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % 500 + 3 for j in range(20 + 17 * i)]} for i in range(n)]

    def run(**kw):
        llm = LLM(f"random:{preset}", milestone="M5", max_model_len=256, kv_cache_memory=2**28, max_num_seqs=16,
                  max_num_batched_tokens=64, attention_backend="triton", **kw)  # fmt: skip
        outs = llm.generate(long_prompts, params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], llm.llm_engine.model_runner

    eager, _ = run(enforce_eager=True)
    graphed, runner = run()
    assert runner.mixed_graphs is not None and runner.mixed_graphs.sizes == [16, 32, 64]
    assert graphed == eager


@pytest.mark.skipif(not CUDA, reason="watches CUDA stream synchronizations")
@pytest.mark.parametrize("milestone", ["M4", "M6"])
def test_async_steps_never_make_the_host_wait_for_the_gpu(milestone):
    """Async scheduling pays only if building step n+1 never waits for step n to finish on the GPU.
    A synchronizing call inside a step (a copy from pageable memory, ``.item()``, ``nonzero``) raises
    under PyTorch's sync debug mode; the one wait, ``finish_step``'s event, is not such a call.
    Prefills beside decodes, greedy and seeded/filtered sampling, shared prefixes (M6: copy-on-write)."""
    llm = LLM("random:tiny-qwen3", milestone=milestone, max_model_len=256, kv_cache_memory=2**28, max_num_seqs=16)
    kinds = [
        dict(temperature=0.0),
        dict(temperature=0.8, seed=3),
        dict(temperature=1.0, top_k=20, top_p=0.9, min_p=0.05),
    ]
    params = [SamplingParams(max_tokens=6 + 2 * i, ignore_eos=True, **kinds[i % 3]) for i in range(9)]
    shared = [3, 5, 7, 11, 13, 17, 19, 23] * 3
    batch = [{"prompt_token_ids": shared + [29 + i] * (i + 1)} for i in range(9)]
    llm.generate(batch[:2], params[:2], use_tqdm=False)  # first use of every path outside the watch
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = llm.generate(batch, params, use_tqdm=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
