"""RMSNorm, optionally fused with the residual add that always precedes it."""

from __future__ import annotations

import torch
from torch import nn

from folovllm.model_executor.layers.custom_op import CustomOp


class RMSNorm(CustomOp):
    """``x / rms(x) * weight``, computed in fp32 and cast back like HF does (so bf16 matches).

    Called with a ``residual`` it first adds it to ``x`` and returns the sum as the
    new residual: every norm inside a decoder is preceded by such an add. The
    fused kernel does both in one pass and updates ``residual`` in place.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def forward_native(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def forward_fused(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        from folovllm.model_executor.layers.ops.rms_norm import rms_norm

        return rms_norm(x, self.weight, self.eps, residual)
