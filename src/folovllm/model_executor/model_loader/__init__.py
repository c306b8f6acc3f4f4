"""``load_model``: a ``ModelConfig`` in, a ready model (eval mode, right device and dtype) out.

``ModelConfig.model`` is one of
- a local HF checkpoint folder (``config.json`` + safetensors, tokenizer optional),
- ``"smollm2-135m"``: the embedded model, converted once into a cached folder,
- ``"random:<preset>"``: a real architecture with seeded random weights (nothing read).

A checkpoint whose ``config.json`` carries a ``quantization_config`` (M7) builds quantized
linear layers; each layer's method post-processes its tensors once they are all loaded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from folovllm.config import ModelConfig
from folovllm.model_executor.layers.quantization import (
    QuantizationConfig,
    checkpoint_quant_config,
    get_quantization_config,
)
from folovllm.model_executor.layers.quantization.gptq import GPTQConfig
from folovllm.model_executor.model_loader.smollm2 import SMOLLM2_NAME, ensure_smollm2
from folovllm.model_executor.model_loader.weight_utils import (
    find_safetensors_files,
    initialize_dummy_weights,
    safetensors_weights_iterator,
)
from folovllm.model_executor.models import get_model_class
from folovllm.model_executor.presets import preset_config

RANDOM_PREFIX = "random:"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class LoadedModel:
    """The model plus what the engine needs beside it."""

    model: nn.Module
    hf_config: Any
    tokenizer: Any | None
    path: Path | None
    name: str
    max_model_len: int
    quant_config: QuantizationConfig | None = None


def load_model(model_config: ModelConfig, allow_quantized: bool = True) -> LoadedModel:
    """``allow_quantized=False`` (engines before M7) refuses a quantized checkpoint unless
    ``model_config.quantization`` asks for it."""
    name = model_config.model
    if name.startswith(RANDOM_PREFIX):
        return _load_random(model_config, name[len(RANDOM_PREFIX) :], allow_quantized)
    if name == SMOLLM2_NAME:
        return _load_folder(model_config, ensure_smollm2(), SMOLLM2_NAME, allow_quantized)
    path = Path(name).expanduser()
    return _load_folder(model_config, path, path.name, allow_quantized)


def _load_folder(model_config: ModelConfig, path: Path, name: str, allow_quantized: bool = True) -> LoadedModel:
    if not path.is_dir():
        raise ValueError(
            f"model {str(path)!r} is not an existing folder (nor {SMOLLM2_NAME!r} or '{RANDOM_PREFIX}<preset>')"
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"model folder {path} has no config.json")
    files = find_safetensors_files(path)
    model_cls = get_model_class(json.loads((path / "config.json").read_text()).get("architectures"))
    hf_config = _override(AutoConfig.from_pretrained(path), model_config)
    quant_config = get_quantization_config(model_config.quantization, hf_config, str(path), allow_quantized)
    model = _build(model_cls, hf_config, model_config, quant_config)
    model.load_weights(safetensors_weights_iterator(files))
    tokenizer = AutoTokenizer.from_pretrained(path) if any((path / f).is_file() for f in TOKENIZER_FILES) else None
    return _finish(model, hf_config, tokenizer, path, name, model_config, quant_config)


def _load_random(model_config: ModelConfig, preset: str, allow_quantized: bool = True) -> LoadedModel:
    """``quantization="gptq"`` gives random 4-bit codes (group 128, symmetric) instead of dense weights, or codes as
    a ``quantization_config`` given in ``hf_overrides`` says (``lm_head: true`` quantizes ``lm_head`` too)."""
    hf_config = _override(preset_config(preset), model_config)
    if checkpoint_quant_config(hf_config) is not None:
        quant_config = get_quantization_config(model_config.quantization, hf_config, RANDOM_PREFIX + preset, allow_quantized)
    else:
        quant_config = GPTQConfig() if model_config.quantization == "gptq" else None
    model = _build(get_model_class(hf_config.architectures), hf_config, model_config, quant_config)
    initialize_dummy_weights(model, model_config.seed)
    return _finish(model, hf_config, None, None, RANDOM_PREFIX + preset, model_config, quant_config)


def _override(hf_config: Any, model_config: ModelConfig) -> Any:
    """``hf_config`` with ``model_config.hf_overrides`` set on it."""
    for key, value in (model_config.hf_overrides or {}).items():
        setattr(hf_config, key, value)
    return hf_config


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _build(
    model_cls: type[nn.Module], hf_config: Any, model_config: ModelConfig, quant_config: QuantizationConfig | None = None
) -> nn.Module:
    """Create the parameters directly on the target device and in the target dtype."""
    with _default_dtype(model_config.dtype), torch.device(model_config.device):
        return model_cls(hf_config, quant_config=quant_config)


def process_weights_after_loading(model: nn.Module) -> None:
    """Let every quantized layer turn its loaded checkpoint tensors into what its kernel reads."""
    for module in model.modules():
        if getattr(module, "quant_method", None) is not None:
            module.quant_method.process_weights_after_loading(module)


def _finish(
    model: nn.Module,
    hf_config: Any,
    tokenizer: Any | None,
    path: Path | None,
    name: str,
    model_config: ModelConfig,
    quant_config: QuantizationConfig | None = None,
) -> LoadedModel:
    process_weights_after_loading(model)
    limit = model_config.max_model_len or math.inf
    return LoadedModel(
        model=model.eval(),
        hf_config=hf_config,
        tokenizer=tokenizer,
        path=path,
        name=name,
        max_model_len=int(min(hf_config.max_position_embeddings, limit)),
        quant_config=quant_config,
    )


__all__ = ["LoadedModel", "load_model", "ensure_smollm2"]
