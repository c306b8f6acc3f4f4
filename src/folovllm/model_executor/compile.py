"""``torch.compile`` of the decoder, as the alternative to hand-fused Triton kernels (M4 part 2).

vLLM compiles its models with Inductor and splits the graph at every attention
call ("piecewise"), because attention reads the paged cache through a kernel of
its own and its launch depends on the step. Here the split comes from a graph
break: each ``Attention`` module's forward is excluded from compilation, so
Inductor compiles and fuses the norms, RoPE, activation and residual adds between
two attention calls, and the backend's kernels run as they are. CUDA graphs then
capture the whole forward, compiled pieces and attention alike.
"""

from __future__ import annotations

import torch
from torch import nn


def compile_model(model: nn.Module) -> None:
    """Compile ``model.model`` (the decoder stack) in place, with a graph break at every attention call."""
    for attn in model.attention_layers():
        attn.forward = torch.compiler.disable(attn.forward)
    model.model.compile()
