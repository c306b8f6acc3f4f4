"""What a quantization format must provide (vLLM's ``QuantizationConfig`` / ``LinearMethodBase``).

The config is parsed from the checkpoint's ``quantization_config``; for each linear layer it hands
out a linear method that owns the layer's weights from creation to matmul. ``Linear`` only calls
the method, so the model code never changes per format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class LinearMethodBase(ABC):
    """Creates, post-processes and multiplies one linear layer's (quantized) weights."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        """Register the checkpoint's tensors on ``layer``, each with a ``weight_loader`` for merged shards."""

    @abstractmethod
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Turn the loaded checkpoint tensors into what ``apply`` reads (called once by the loader)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x [..., input_size]`` -> ``[..., output_size]``."""

    @abstractmethod
    def init_dummy_weights(self, layer: nn.Module, generator: torch.Generator, std: float) -> None:
        """Seeded random checkpoint tensors whose weights have about ``std`` spread (``random:`` models)."""


class QuantizationConfig(ABC):
    """One quantization format's settings, read from ``config.json``'s ``quantization_config``.
    ``lm_head_quantized`` (vLLM's name): the output projection is quantized too, not only the decoder's."""

    name: str
    lm_head_quantized: bool = False

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> "QuantizationConfig":
        """Parse and validate; refuse (``ValueError``) anything this engine cannot serve."""

    @abstractmethod
    def get_linear_method(self) -> LinearMethodBase:
        """A fresh linear method for one layer."""

    def for_layer(self, prefixes: list[str]) -> "QuantizationConfig | None":
        """The settings of the layer holding the checkpoint modules ``prefixes`` (several when merged), or None
        to keep it dense: the same for every layer unless the format has per-module overrides."""
        return self
