"""Linear layers whose weights arrive from a checkpoint in HF's (unmerged) layout.

Parameters are created with ``torch.empty``: the loader (or the random-preset
initialiser) always overwrites them, so initialising twice would only cost time.
Projections that read the same input are stacked along the output dim (vLLM's
``QKVParallelLinear`` / ``MergedColumnParallelLinear``) so one GEMM computes them
all; HF's separate tensors are copied into row ranges ("shards") of the stack.
With a ``quant_config`` (M7) a linear method owns the weights instead: it creates
them (each with a ``weight_loader`` that knows its own shard layout), post-processes
them after loading and does the matmul, so the model code stays the same.
On the fast path (M4, ``enable_fused_ops``) a dense projection of one row takes the skinny
GEMM for the shapes this GPU model was measured faster on (``ops/skinny_gemm.py``), with the
RMSNorm before it (``forward_normed``) or the SiLU·mul before it (``forward_activated``) fused in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from folovllm.model_executor.layers.custom_op import CustomOp
from folovllm.model_executor.layers.ops.skinny_gemm import (
    SkinnyPlan,
    plan_skinny_gemm,
    prologues_fused,
    skinny_gemm,
    skinny_gemm_rms_norm,
    skinny_gemm_silu_mul,
)

if TYPE_CHECKING:
    from folovllm.model_executor.layers.activation import SiluAndMul
    from folovllm.model_executor.layers.layernorm import RMSNorm
    from folovllm.model_executor.layers.quantization.base_config import QuantizationConfig


def copy_weight(target: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    """Copy a checkpoint tensor into a parameter (or a shard of one), refusing a shape mismatch."""
    if target.shape != loaded.shape:
        raise ValueError(f"tensor {name!r} has shape {tuple(loaded.shape)}, expected {tuple(target.shape)}")
    target.copy_(loaded)


class Linear(CustomOp):
    """``y = x W^T (+ b)`` with ``W [output_size, input_size]``, or whatever ``quant_config``'s method stores."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        quant_config: QuantizationConfig | None = None,
        prefix: str | list[str] = "",
    ) -> None:
        """``prefix``: the checkpoint module name(s) this layer holds (a merged layer names each projection), for
        per-module quantization settings (``QuantizationConfig.for_layer``)."""
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        if quant_config is not None:
            quant_config = quant_config.for_layer([prefix] if isinstance(prefix, str) else prefix)
        self.quant_method = quant_config.get_linear_method() if quant_config is not None else None
        if self.quant_method is None:
            self.weight = nn.Parameter(torch.empty(output_size, input_size))
        else:
            self.quant_method.create_weights(self, input_size, output_size)
        self.bias = nn.Parameter(torch.empty(output_size)) if bias else None

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(self, x, self.bias)
        return F.linear(x, self.weight, self.bias)

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._skinny_plan(x)
        return self.forward_native(x) if plan is None else skinny_gemm(x, self.weight, self.bias, plan)

    def forward_normed(
        self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(norm(x + residual)), x + residual)`` (no add without ``residual``). At one row on the fast
        path one kernel: every program of the GEMM normalizes the row itself, so the norm's own launch goes."""
        plan = self._skinny_plan(x) if norm.use_fused and prologues_fused() else None
        if plan is not None:
            return skinny_gemm_rms_norm(x, residual, norm.weight, norm.eps, self.weight, self.bias, plan)
        if residual is None:
            return self(norm(x)), x
        hidden, residual = norm(x, residual)
        return self(hidden), residual

    def forward_activated(self, act: SiluAndMul, x: torch.Tensor) -> torch.Tensor:
        """``self(act(x))``; at one row on the fast path one kernel that applies SiLU·mul to its input slice."""
        plan = self._skinny_plan(x) if act.use_fused and prologues_fused() else None
        return self(act(x)) if plan is None else skinny_gemm_silu_mul(x, self.weight, self.bias, plan)

    def _skinny_plan(self, x: torch.Tensor) -> SkinnyPlan | None:
        """The tuned skinny-GEMM plan for this dense projection of ``x``'s rows on the fast path, else None."""
        if not self.use_fused or self.quant_method is not None or x.dim() != 2 or x.stride(1) != 1:
            return None
        return plan_skinny_gemm(x.shape[0], self.input_size, self.output_size, x.dtype, x.device)


class MergedLinear(Linear):
    """Several projections of one input stacked along the output dim (``gate_up_proj``)."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = False,
        quant_config: QuantizationConfig | None = None,
        prefixes: list[str] | None = None,
    ) -> None:
        super().__init__(input_size, sum(output_sizes), bias, quant_config, prefixes or [""])
        self.output_sizes = list(output_sizes)
        self.shard_ids: list[int | str] = list(range(len(output_sizes)))

    def shard_rows(self, shard_id: int | str) -> slice:
        """Rows of the stacked weight (and bias) that hold projection ``shard_id``."""
        index = self.shard_ids.index(shard_id)
        start = sum(self.output_sizes[:index])
        return slice(start, start + self.output_sizes[index])


class QKVLinear(MergedLinear):
    """Q, K and V stacked into one ``qkv_proj``; with GQA the K/V shards are narrower."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        """``prefix``: the attention module's checkpoint name (its projections are ``{prefix}.q_proj`` ...)."""
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        names = [f"{prefix}.{proj}" for proj in ("q_proj", "k_proj", "v_proj")]
        super().__init__(hidden_size, [q_size, kv_size, kv_size], bias, quant_config, names)
        self.q_size, self.kv_size = q_size, kv_size
        self.shard_ids = ["q", "k", "v"]


class VocabEmbedding(nn.Module):
    """Token id -> row of ``weight [vocab, hidden]``; a tied LM head multiplies by the same matrix."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)
