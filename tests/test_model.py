"""Our Llama/Qwen2/Qwen3 against HF transformers on the same weights (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from folovllm.attention.layer import Attention, prefill_metadata
from folovllm.config import ModelConfig
from folovllm.model_executor.layers.rotary_embedding import RotaryEmbedding, rope_parameters
from folovllm.model_executor.model_loader import load_model
from folovllm.model_executor.presets import param_count, preset_config

SEQ_LENS = [5, 17, 40]  # the longest runs past the llama3 variant's original context (32)


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _flat_logits(model: torch.nn.Module, seqs: list[torch.Tensor]) -> torch.Tensor:
    """All sequences as ONE flattened forward, logits for every token."""
    lens = [len(s) for s in seqs]
    positions = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad():
        hidden = model(torch.cat(seqs), positions, prefill_metadata(lens))
        return model.compute_logits(hidden)


def _hf_logits(folder: Path, seqs: list[torch.Tensor]) -> torch.Tensor:
    """HF's logits, one sequence per forward."""
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return torch.cat([hf(s[None]).logits[0] for s in seqs])


def _load_fp32(folder: Path):
    return load_model(ModelConfig(model=str(folder), device="cpu", dtype="float32"))


@pytest.mark.parametrize("variant", ["llama", "llama3", "qwen2", "qwen3", "llama-sharded"])
def test_logits_match_hf(tiny_checkpoint, variant: str) -> None:
    folder = tiny_checkpoint(variant)
    loaded = _load_fp32(folder)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, loaded.hf_config.vocab_size, (n,), generator=gen) for n in SEQ_LENS]
    ours = _flat_logits(loaded.model, seqs)
    assert ours.dtype == torch.float32 and ours.shape == (sum(SEQ_LENS), loaded.hf_config.vocab_size)
    assert _rel_err(ours, _hf_logits(folder, seqs)) < 1e-4


def test_sharded_checkpoint_is_really_sharded(tiny_checkpoint) -> None:
    folder = tiny_checkpoint("llama-sharded")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 1


def test_logits_do_not_depend_on_batch_neighbours(tiny_checkpoint) -> None:
    """A sequence's logits do not depend on what else shares the flattened batch."""
    loaded = _load_fp32(tiny_checkpoint("qwen3"))
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 512, (n,), generator=gen) for n in SEQ_LENS]
    together = _flat_logits(loaded.model, seqs)
    alone = torch.cat([_flat_logits(loaded.model, [s]) for s in reversed(seqs)])
    reordered = torch.cat(list(reversed(together.split(SEQ_LENS))))
    torch.testing.assert_close(alone, reordered, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant, tied", [("llama", False), ("llama3", True), ("qwen2", True), ("qwen3", False)])
def test_tied_embeddings_and_param_count(tiny_checkpoint, variant: str, tied: bool) -> None:
    model = _load_fp32(tiny_checkpoint(variant)).model
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    assert sum(p.numel() for p in model.parameters()) == param_count(model.config)


def test_merged_projections_and_attention_layers(tiny_checkpoint) -> None:
    loaded = _load_fp32(tiny_checkpoint("qwen3"))
    model, cfg = loaded.model, loaded.hf_config
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.weight.shape == ((cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * 32, 64)
    assert model.model.layers[0].mlp.gate_up_proj.weight.shape == (2 * cfg.intermediate_size, 64)
    layers = model.attention_layers()
    assert len(layers) == cfg.num_hidden_layers and all(isinstance(a, Attention) for a in layers)
    assert (layers[0].num_heads, layers[0].num_kv_heads, layers[0].head_dim) == (4, 2, 32)
    assert layers[0].scale == 32**-0.5


def test_qwen2_bias_only_on_qkv(tiny_checkpoint) -> None:
    layer = _load_fp32(tiny_checkpoint("qwen2")).model.model.layers[0]
    assert layer.self_attn.qkv_proj.bias is not None
    assert layer.self_attn.o_proj.bias is None and layer.mlp.gate_up_proj.bias is None


def test_llama3_rope_cache_matches_hf_at_real_shape() -> None:
    """Llama-3.2-1B's scaled RoPE (factor 32, 128k positions) equals HF's cos/sin."""
    cfg = preset_config("llama-3.2-1b")
    ours = RotaryEmbedding(64, cfg.max_position_embeddings, rope_parameters(cfg))
    positions = torch.tensor([0, 1, 7, 100, 8191, 8192, 20000, 131071])
    cos, sin = ours.cos_sin(positions, torch.float32)
    dummy = torch.zeros(1, len(positions), 64)
    ref_cos, ref_sin = LlamaRotaryEmbedding(cfg)(dummy, positions[None])
    torch.testing.assert_close(cos[:, 0], ref_cos[0, :, :32], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[:, 0], ref_sin[0, :, :32], rtol=0, atol=1e-6)


def test_old_style_rope_config_is_read() -> None:
    """Pre-transformers-5 configs keep ``rope_theta`` and ``rope_scaling`` (with key ``type``) apart."""

    class OldConfig:
        rope_theta = 500000.0
        rope_scaling = {
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }

    params = rope_parameters(OldConfig())
    assert params["rope_type"] == "llama3" and params["rope_theta"] == 500000.0


def test_unsupported_rope_type_is_refused() -> None:
    with pytest.raises(ValueError, match=r"rope_type 'yarn' is not supported; supported: \['default', 'llama3'\]"):
        RotaryEmbedding(16, 32, {"rope_type": "yarn", "rope_theta": 10000.0})


@pytest.mark.slow
def test_smollm2_logits_match_hf(smollm2_dir: Path) -> None:
    loaded = load_model(ModelConfig(model="smollm2-135m", device="cpu", dtype="float32"))
    assert loaded.path == smollm2_dir and loaded.name == "smollm2-135m"
    tok = loaded.tokenizer
    prompts = ["Hi!", "What is the capital of France?", "Explain in one sentence why a KV cache makes decoding faster."]
    seqs = [
        torch.tensor(
            tok.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
        for p in prompts
    ]
    assert len({len(s) for s in seqs}) == 3
    assert _rel_err(_flat_logits(loaded.model, seqs), _hf_logits(smollm2_dir, seqs)) < 1e-4
