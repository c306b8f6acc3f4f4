"""``compilation_config=3``: Inductor compiles the decoder between attention calls (M4 part 2's alternative to
hand-fused kernels). On CPU the compiled model must give the eager model's greedy tokens; on a GPU, under CUDA
graphs too."""

from __future__ import annotations

import pytest
import torch

from folovllm import LLM, SamplingParams
from folovllm.config import ModelConfig

PROMPTS = [{"prompt_token_ids": [(7 * i + 3 * j) % 500 + 3 for j in range(4 + 5 * i)]} for i in range(3)]


def generate(**kw) -> list[list[int]]:
    llm = LLM("random:tiny-qwen3", milestone="M4", max_model_len=64, kv_cache_memory=2**21, block_size=4, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.mark.parametrize("value", [1, 2, True, "3"])
def test_compilation_config_names_the_field(value):
    with pytest.raises(ValueError, match=r"compilation_config must be one of \(0, 3\)"):
        ModelConfig(compilation_config=value)


def test_compiled_decoder_generates_the_eager_tokens_on_cpu():
    pytest.importorskip("triton")
    kw = dict(device="cpu", dtype="float32", attention_backend="triton")
    assert generate(compilation_config=3, **kw) == generate(**kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs over compiled code need a GPU")
def test_compiled_decoder_under_cuda_graphs_on_gpu():
    kw = dict(dtype="float32", fuse_kernels=False, attention_backend="triton")
    assert generate(compilation_config=3, **kw) == generate(enforce_eager=True, **kw)
