"""Layers with two implementations: plain PyTorch (the reference) and a fused Triton kernel.

``forward_native`` is the readable version every test compares with and what
runs on CPU; ``forward_fused`` is the M4 fast path. ``enable_fused_ops`` flips a
whole model at once (the M4 preset on a GPU), so the model file never changes.
"""

from __future__ import annotations

from torch import nn


class CustomOp(nn.Module):
    use_fused: bool = False

    def forward(self, *args, **kwargs):
        return self.forward_fused(*args, **kwargs) if self.use_fused else self.forward_native(*args, **kwargs)

    def forward_native(self, *args, **kwargs):
        raise NotImplementedError

    def forward_fused(self, *args, **kwargs):
        raise NotImplementedError


def enable_fused_ops(model: nn.Module, enabled: bool = True) -> int:
    """Switch every fusable layer of ``model`` to its fused kernel; returns how many were switched."""
    switched = 0
    for module in model.modules():
        if hasattr(module, "use_fused"):
            module.use_fused = enabled
            switched += 1
    return switched
