"""Perplexity: ``exp`` of the mean negative log-likelihood of each next token of held-out text.

The text is cut into non-overlapping windows of ``seq_len`` tokens; each window is one prefill
through our model (no KV cache), and every position predicts the next token of its window.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from folovllm.attention.layer import prefill_metadata


@torch.inference_mode()
def perplexity(model: nn.Module, token_ids: torch.Tensor, seq_len: int = 512) -> dict[str, Any]:
    """Perplexity of ``model`` on ``token_ids [n]``: ``{"perplexity", "nll", "tokens", "windows"}``."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    device = next(model.parameters()).device
    nll, count, windows = 0.0, 0, 0
    for start in range(0, len(token_ids) - 1, seq_len):
        ids = token_ids[start : start + seq_len].to(device)
        if len(ids) < 2:
            break
        hidden = model(ids, torch.arange(len(ids), device=device), prefill_metadata([len(ids)], device))
        logits = model.compute_logits(hidden[:-1])
        nll += F.cross_entropy(logits, ids[1:], reduction="sum").item()
        count += len(ids) - 1
        windows += 1
    if count == 0:
        raise ValueError("perplexity needs at least 2 tokens")
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": windows}


def evaluate_perplexity(
    model: str,
    max_tokens: int | None = None,
    seq_len: int = 512,
    device: str | None = None,
    dtype: str | None = None,
    quantization: str | None = None,
) -> dict[str, Any]:
    """``folovllm eval perplexity``: load ``model`` (a quantized checkpoint runs quantized) and score the
    held-out split of Python's docs; the result carries where it came from."""
    from folovllm.benchmarks.common import provenance
    from folovllm.config import ModelConfig
    from folovllm.model_executor.model_loader import load_model
    from folovllm.quantization.calibration import EVAL_EVERY, evaluation_ids

    config = ModelConfig(model=model, device=device or "auto", dtype=dtype or "auto", quantization=quantization)
    loaded = load_model(config)
    ids = evaluation_ids(loaded.tokenizer, loaded.hf_config.vocab_size, max_tokens)
    quant = getattr(loaded.hf_config, "quantization_config", None)
    return {
        **provenance(torch.device(config.device), loaded.name, config.dtype),
        "benchmark": "perplexity",
        "workload": {
            "text": f"pydoc_data.topics, every {EVAL_EVERY}th topic (held out from calibration)"
            if loaded.tokenizer is not None
            else "seeded random token ids",
            "max_tokens": max_tokens,
            "seq_len": seq_len,
        },
        "quantization_config": quant if quant is None or isinstance(quant, dict) else quant.to_dict(),
        **perplexity(loaded.model, ids, seq_len),
    }
