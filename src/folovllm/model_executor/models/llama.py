"""Llama, Qwen2 and Qwen3: one decoder with per-family switches.

The families differ only in details: Qwen2 puts a bias on q/k/v, Qwen3 RMS-normalises
each head of q and k before RoPE (and sets ``head_dim`` independently of
``hidden_size``), Llama may carry ``attention_bias``/``mlp_bias``. Every module works
on a flattened batch of T tokens from any number of requests; only the
``Attention`` layer (through ``attn_metadata``) knows where one sequence ends.
Parameter names follow HF's, except the merged ``qkv_proj`` and ``gate_up_proj``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from folovllm.attention.backends.abstract import AttentionMetadata
from folovllm.attention.layer import Attention
from folovllm.model_executor.layers.activation import SiluAndMul
from folovllm.model_executor.layers.layernorm import RMSNorm
from folovllm.model_executor.layers.linear import Linear, MergedLinear, QKVLinear, VocabEmbedding, copy_weight
from folovllm.model_executor.layers.rotary_embedding import RotaryEmbedding, rope_parameters

if TYPE_CHECKING:
    from folovllm.model_executor.layers.quantization.base_config import QuantizationConfig

# Merged parameter -> the HF projections stacked into it, with their shard ids.
_MERGED: dict[str, tuple[tuple[str, int | str], ...]] = {
    "qkv_proj": (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")),
    "gate_up_proj": (("gate_proj", 0), ("up_proj", 1)),
}


def head_dim_of(hf_config: Any) -> int:
    """``head_dim`` when the config sets it (Qwen3), else ``hidden_size // num_attention_heads``."""
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def num_kv_heads_of(hf_config: Any) -> int:
    return getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads


class LlamaMLP(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        bias: bool,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        names = [f"{prefix}.gate_proj", f"{prefix}.up_proj"]
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size] * 2, bias, quant_config, names)
        self.down_proj = Linear(intermediate_size, hidden_size, bias, quant_config, f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``gate_up``: ``gate_up_proj``'s output (the layer runs it with the norm before it)."""
        return self.down_proj.forward_activated(self.act_fn, gate_up)


class LlamaAttention(nn.Module):
    """qkv projection, optional per-head q/k norm, RoPE, then the engine's ``Attention``."""

    def __init__(
        self,
        hf_config: Any,
        rotary_emb: RotaryEmbedding,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.rotary_emb = rotary_emb  # shared by every layer
        self.num_heads = hf_config.num_attention_heads
        self.num_kv_heads = num_kv_heads_of(hf_config)
        self.head_dim = head_dim_of(hf_config)
        self.qkv_proj = QKVLinear(
            hf_config.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads, qkv_bias, quant_config, prefix
        )
        self.o_proj = Linear(self.num_heads * self.head_dim, hf_config.hidden_size, o_bias, quant_config, f"{prefix}.o_proj")
        self.q_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps) if qk_norm else None
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, self.head_dim**-0.5)

    def forward(
        self, positions: torch.Tensor, qkv: torch.Tensor, cos_sin: Any, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        """``qkv``: ``qkv_proj``'s output (the layer runs it with the norm before it)."""
        num_tokens = qkv.shape[0]
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        # The fused RoPE kernel also writes K/V into the cache, so the backend's store is skipped.
        target = self.attn.cache_target(attn_metadata) if self.rotary_emb.use_fused else None
        q, k = self.rotary_emb(positions, q, k, cos_sin, self.q_norm, self.k_norm, v, target)
        out = self.attn(q, k, v, attn_metadata, kv_stored=target is not None)
        return self.o_proj(out)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block; the residual stream is carried separately so each add fuses into a norm, and each
    norm is run by the projection after it (``Linear.forward_normed``: one kernel at one row on the fast path)."""

    def __init__(
        self,
        hf_config: Any,
        rotary_emb: RotaryEmbedding,
        qkv_bias: bool,
        o_bias: bool,
        mlp_bias: bool,
        qk_norm: bool,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        attn_prefix, mlp_prefix = f"{prefix}.self_attn", f"{prefix}.mlp"
        self.self_attn = LlamaAttention(hf_config, rotary_emb, qkv_bias, o_bias, qk_norm, quant_config, attn_prefix)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.mlp = LlamaMLP(hf_config.hidden_size, hf_config.intermediate_size, mlp_bias, quant_config, mlp_prefix)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos_sin: Any,
        attn_metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        qkv, residual = self.self_attn.qkv_proj.forward_normed(self.input_layernorm, hidden, residual)
        hidden = self.self_attn(positions, qkv, cos_sin, attn_metadata)
        gate_up, residual = self.mlp.gate_up_proj.forward_normed(self.post_attention_layernorm, hidden, residual)
        return self.mlp(gate_up), residual


class LlamaModel(nn.Module):
    def __init__(
        self,
        hf_config: Any,
        qkv_bias: bool,
        o_bias: bool,
        mlp_bias: bool,
        qk_norm: bool,
        quant_config: QuantizationConfig | None = None,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(hf_config.vocab_size, hf_config.hidden_size)
        self.rotary_emb = RotaryEmbedding(
            head_dim_of(hf_config), hf_config.max_position_embeddings, rope_parameters(hf_config)
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(
                hf_config, self.rotary_emb, qkv_bias, o_bias, mlp_bias, qk_norm, quant_config, f"model.layers.{i}"
            )
            for i in range(hf_config.num_hidden_layers)
        )
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        cos_sin = self.rotary_emb.cos_sin(positions, hidden.dtype)  # once per forward, shared by the layers
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, cos_sin, attn_metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """``forward`` maps a flattened token batch to final hidden states; ``compute_logits`` projects rows.

    ``quant_config`` (M7) quantizes the decoder layers' projections, and ``lm_head`` when the checkpoint says so
    (``lm_head_quantized``; tied embeddings are then untied: the embedding table stays dense). Embeddings stay dense.
    Every layer is built with its checkpoint name(s), so per-module settings (GPTQ's ``dynamic``) reach it.
    """

    qk_norm = False

    def __init__(self, hf_config: Any, quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        _check_supported(hf_config)
        self.config = hf_config
        head_quant = quant_config if quant_config is not None and quant_config.lm_head_quantized else None
        qkv_bias, o_bias, mlp_bias = self.biases(hf_config)
        self.model = LlamaModel(hf_config, qkv_bias, o_bias, mlp_bias, self.qk_norm, quant_config)
        self.lm_head = Linear(hf_config.hidden_size, hf_config.vocab_size, quant_config=head_quant, prefix="lm_head")
        tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.tie_word_embeddings = tied and self.lm_head.quant_method is None  # a quantized lm_head has its own codes
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def biases(hf_config: Any) -> tuple[bool, bool, bool]:
        """Which of (q/k/v, o_proj, MLP) projections carry a bias."""
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        return attention_bias, attention_bias, bool(getattr(hf_config, "mlp_bias", False))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata) -> torch.Tensor:
        """``input_ids, positions [T]`` -> hidden states ``[T, hidden_size]``."""
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden_size]`` -> fp32 logits ``[N, vocab_size]`` (only for rows that get sampled)."""
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[Attention]:
        """One ``Attention`` per decoder layer, in order, for the runner to bind KV caches to."""
        return [layer.self_attn.attn for layer in self.model.layers]

    def checkpoint_layout(self) -> dict[str, tuple[str, int | str | None]]:
        """HF tensor name -> (our parameter name, shard id or None) for every tensor we need."""
        layout: dict[str, tuple[str, int | str | None]] = {}
        for name, _ in self.named_parameters():
            module_name, _, leaf = name.rpartition(".")
            parent, _, proj = module_name.rpartition(".")
            prefix = f"{parent}." if parent else ""
            for hf_proj, shard in _MERGED.get(proj, ((proj, None),)):
                layout[f"{prefix}{hf_proj}.{leaf}"] = (name, shard)
        return layout

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into our (partly merged) parameters; return the parameter names filled.

        Raises ``ValueError`` for an unknown, mis-shaped or missing tensor. ``lm_head.weight``
        is accepted and ignored when embeddings are tied (some checkpoints store it anyway).
        """
        layout = self.checkpoint_layout()
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        seen: set[str] = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.tie_word_embeddings):
                continue
            if name not in layout:
                raise ValueError(f"unexpected tensor {name!r}: {type(self).__name__} has no parameter for it")
            param_name, shard = layout[name]
            param = params[param_name]
            with torch.no_grad():
                if hasattr(param, "weight_loader"):  # quantized tensors know their own shard layout
                    param.weight_loader(tensor, shard, name)
                else:
                    target = param.data
                    if shard is not None:
                        target = target[modules[param_name.rpartition(".")[0]].shard_rows(shard)]
                    copy_weight(target, tensor, name)
            seen.add(name)
        missing = sorted(set(layout) - seen)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"checkpoint is missing tensor {missing[0]!r}{more}")
        return {layout[name][0] for name in seen}


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with a bias on q/k/v (never on o_proj or the MLP)."""

    @staticmethod
    def biases(hf_config: Any) -> tuple[bool, bool, bool]:
        return True, False, False


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Llama with RMSNorm over each head of q and k, applied before RoPE."""

    qk_norm = True


def _check_supported(hf_config: Any) -> None:
    """Refuse config features this decoder does not implement instead of computing wrong logits."""
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act must be 'silu', got {hf_config.hidden_act!r}")
    if getattr(hf_config, "use_sliding_window", False):
        raise ValueError("use_sliding_window=True is not supported (every layer attends to the full context)")
    num_heads, num_kv_heads = hf_config.num_attention_heads, num_kv_heads_of(hf_config)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})")
