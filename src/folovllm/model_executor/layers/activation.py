"""The gated activation of Llama-style MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from folovllm.model_executor.layers.custom_op import CustomOp


class SiluAndMul(CustomOp):
    """``silu(gate) * up`` on the output of the merged ``gate_up_proj`` (``[..., 2 * I] -> [..., I]``)."""

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        from folovllm.model_executor.layers.ops.activation import silu_and_mul

        return silu_and_mul(x)
