"""Helpers for Triton kernels that must also run on CPU tensors (tests, notebooks on a laptop)."""

from folovllm.triton_utils.interpreter import for_device

__all__ = ["for_device"]
