"""Real architectures at their published shapes, for ``"random:<preset>"`` models.

A preset is the architecture part of the model's HF ``config.json``; the loader
fills its weights with seeded noise, so throughput and memory behave like the
real model without downloading anything. ``tiny-*`` presets are for tests.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

from folovllm.model_executor.models import get_model_class
from folovllm.model_executor.models.llama import head_dim_of, num_kv_heads_of

_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,
    "head_dim": 128,
    "num_key_value_heads": 8,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
_TINY = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": {
        **_QWEN3,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "tie_word_embeddings": True,
    },
    "qwen3-1.7b": {
        **_QWEN3,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "tie_word_embeddings": True,
    },
    "qwen3-8b": {
        **_QWEN3,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "tie_word_embeddings": False,
    },
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    "tiny-llama": {**_TINY, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False},
    "tiny-qwen2": {**_TINY, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "tie_word_embeddings": True},
    "tiny-qwen3": {
        **_TINY,
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "head_dim": 32,
        "tie_word_embeddings": True,
    },
}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def preset_config(name: str) -> PretrainedConfig:
    """The HF config of preset ``name`` (a fresh object each call)."""
    if name not in PRESETS:
        raise ValueError(f"unknown random preset {name!r}; presets: {list_presets()}")
    kwargs = dict(PRESETS[name])
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def param_count(hf_config: Any) -> int:
    """Number of parameters the model of ``hf_config`` has (tied embeddings counted once), without building it."""
    model_cls = get_model_class(getattr(hf_config, "architectures", None))
    qkv_bias, o_bias, mlp_bias = model_cls.biases(hf_config)
    hidden, inter = hf_config.hidden_size, hf_config.intermediate_size
    head_dim = head_dim_of(hf_config)
    q_size, kv_size = hf_config.num_attention_heads * head_dim, num_kv_heads_of(hf_config) * head_dim
    qkv_rows = q_size + 2 * kv_size
    attention = hidden * qkv_rows + q_size * hidden + qkv_bias * qkv_rows + o_bias * hidden
    mlp = 3 * hidden * inter + mlp_bias * (2 * inter + hidden)
    norms = 2 * hidden + (2 * head_dim if model_cls.qk_norm else 0)
    embeddings = hf_config.vocab_size * hidden
    lm_head = 0 if getattr(hf_config, "tie_word_embeddings", False) else embeddings
    return embeddings + hf_config.num_hidden_layers * (attention + mlp + norms) + hidden + lm_head
