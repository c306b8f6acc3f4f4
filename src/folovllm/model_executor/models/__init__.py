"""HF architecture name -> our model class."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from folovllm.model_executor.models.llama import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def get_model_class(architectures: Sequence[str] | None) -> type[nn.Module]:
    """The class for the first architecture we support, or a ``ValueError`` naming them all."""
    for arch in architectures or ():
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(f"unsupported architecture {list(architectures or [])}; supported: {sorted(MODEL_REGISTRY)}")


__all__ = ["MODEL_REGISTRY", "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "get_model_class"]
