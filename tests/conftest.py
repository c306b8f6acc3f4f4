"""Shared fixtures: tiny random HF checkpoints (written once per session) and the embedded SmolLM2.

Without a GPU, Triton kernels run under Triton's own interpreter: ``TRITON_INTERPRET=1`` must be set
before anything imports Triton, so it is set here, first (``tests/test_interpreter.py`` covers the
fallback for processes that imported Triton for compiling).
"""

from __future__ import annotations

import os

import torch  # importing torch does not import Triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config

_TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)

# Variants cover: plain Llama (untied), llama3 rope scaling (tied; positions past
# original_max_position_embeddings=32 hit all three frequency bands), Qwen2 q/k/v bias
# (tied), Qwen3 q/k norm with head_dim != hidden/heads (untied), and a sharded checkpoint.
TINY_VARIANTS: dict[str, Callable[[], object]] = {
    "llama": lambda: LlamaConfig(**_TINY, tie_word_embeddings=False, architectures=["LlamaForCausalLM"]),
    "llama3": lambda: LlamaConfig(
        **_TINY,
        tie_word_embeddings=True,
        architectures=["LlamaForCausalLM"],
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "qwen2": lambda: Qwen2Config(**_TINY, tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"]),
    "qwen3": lambda: Qwen3Config(**_TINY, head_dim=32, tie_word_embeddings=False, architectures=["Qwen3ForCausalLM"]),
}
SHARDED = "llama-sharded"


def _tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``w3 .. w{vocab-1}``: built offline, enough to encode and decode."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Large random weights everywhere (norms around 1): HF's init leaves norms at 1 and biases at 0,
    which would hide a misplaced norm weight or bias."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.2 * noise if "norm" in name else 0.2 * noise)


def write_tiny_checkpoint(variant: str, folder: Path, max_shard_size: str = "50GB") -> Path:
    """Save a tiny random HF model of ``variant`` (plus a tokenizer) into ``folder``."""
    config = TINY_VARIANTS[variant]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed=sum(map(ord, variant)))
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    _tiny_tokenizer(config.vocab_size).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_checkpoint(variant) -> folder`` for a variant of ``TINY_VARIANTS`` or ``"llama-sharded"``."""
    made: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{variant}")
            if variant == SHARDED:
                made[variant] = write_tiny_checkpoint("llama", folder, max_shard_size="100KB")
            else:
                made[variant] = write_tiny_checkpoint(variant, folder)
        return made[variant]

    return get


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The cached SmolLM2 folder (converted from the GGUF on the first run, ~20 s)."""
    from folovllm.model_executor.model_loader import ensure_smollm2

    return ensure_smollm2()
