"""Sampling: per-step metadata and the batched, vectorized sampler."""

from folovllm.sample.metadata import SamplingMetadata
from folovllm.sample.sampler import (
    Sampler,
    SamplerOutput,
    apply_min_p,
    apply_temperature,
    apply_top_k_top_p,
    random_sample,
)

__all__ = [
    "Sampler",
    "SamplerOutput",
    "SamplingMetadata",
    "apply_min_p",
    "apply_temperature",
    "apply_top_k_top_p",
    "random_sample",
]
