"""Quantized linear layers (M7): format name -> config class, and the loader's one entry point."""

from __future__ import annotations

from typing import Any

from folovllm.model_executor.layers.quantization.base_config import LinearMethodBase, QuantizationConfig
from folovllm.model_executor.layers.quantization.gptq import GPTQConfig, GPTQLinearMethod

QUANTIZATION_CONFIGS: dict[str, type[QuantizationConfig]] = {"gptq": GPTQConfig}


def checkpoint_quant_config(hf_config: Any) -> dict[str, Any] | None:
    """The checkpoint's ``quantization_config`` as a dict (transformers may hand back an object)."""
    config = getattr(hf_config, "quantization_config", None)
    if config is None or isinstance(config, dict):
        return config
    return config.to_dict()


def get_quantization_config(
    quantization: str | None, hf_config: Any, source: str, allow_quantized: bool = True
) -> QuantizationConfig | None:
    """What the engine quantizes with: the checkpoint's ``quantization_config`` (read only when
    ``allow_quantized``, i.e. from M7 on, or when ``quantization`` names it), or None."""
    found = checkpoint_quant_config(hf_config)
    if found is None:
        if quantization is not None:
            raise ValueError(
                f"quantization={quantization!r} needs a quantized checkpoint; {source} has no quantization_config"
            )
        return None
    method = found.get("quant_method")
    if quantization is None and not allow_quantized:
        raise ValueError(
            f"{source} is a quantized checkpoint (quant_method={method!r}); engines before M7 "
            "read dense weights only: use milestone='M7' (or None), or pass quantization="
            f"{method!r}"
        )
    if quantization is not None and method != quantization:
        raise ValueError(f"quantization={quantization!r} but {source} is quantized with {method!r}")
    if method not in QUANTIZATION_CONFIGS:
        raise ValueError(f"{source}: quant_method {method!r} is not supported; supported: {sorted(QUANTIZATION_CONFIGS)}")
    return QUANTIZATION_CONFIGS[method].from_config(found)


__all__ = [
    "QUANTIZATION_CONFIGS",
    "GPTQConfig",
    "GPTQLinearMethod",
    "LinearMethodBase",
    "QuantizationConfig",
    "checkpoint_quant_config",
    "get_quantization_config",
]
