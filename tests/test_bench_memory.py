"""Benchmarks that compare several configs in one process build one engine per config; each must be gone
(KV cache included) before the next is built, or on a GPU the next engine's memory profile counts the
previous engine's KV cache as its own activations and finds no room (bench step did, on an H200)."""

from __future__ import annotations

import gc
import weakref

import pytest

from folovllm.benchmarks import prefix, serve, step_profile, throughput
from folovllm.entrypoints.llm import LLM


@pytest.fixture
def engines(monkeypatch):
    """Patch ``LLM`` in every bench module; each construction checks that earlier runners were freed."""
    runners: list[weakref.ref] = []
    alive_at_build: list[int] = []

    class TrackedLLM(LLM):
        def __init__(self, *args, **kwargs):
            gc.collect()
            alive_at_build.append(sum(r() is not None for r in runners))
            super().__init__(*args, **kwargs)
            runners.append(weakref.ref(self.llm_engine.model_runner))

    for module in (prefix, serve, step_profile, throughput):
        monkeypatch.setattr(module, "LLM", TrackedLLM)
    return alive_at_build


KW = dict(device="cpu", max_model_len=128, kv_cache_memory=2**20, block_size=4)


def test_bench_step_frees_each_engine(engines):
    step_profile.bench_step("random:tiny-llama", ["M3", "M4"], [1], prompt_len=8, steps=3, device="cpu", timeline=False)
    assert engines == [0, 0]


def test_bench_throughput_frees_each_engine(engines):
    throughput.bench_throughput("random:tiny-llama", ["M3", "M4"], num_prompts=3, input_len=(4, 8), output_len=(2, 4), **KW)
    assert engines == [0, 0]


def test_bench_serve_frees_each_engine(engines):
    serve.bench_serve("random:tiny-llama", ["M3", "M4"], num_prompts=3, input_len=(4, 8), output_len=(2, 4), **KW)
    assert engines == [0, 0]


def test_bench_prefix_frees_each_engine(engines):
    prefix.bench_prefix("random:tiny-llama", ["M4", "M6"], parts=("ttft",), prefix_len=12, suffix_len=4, repeat=1, **KW)
    assert engines == [0, 0]
