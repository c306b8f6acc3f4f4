"""``folovllm quantize``: a dense checkpoint in, a GPTQ-format checkpoint out.

One forward pass of the calibration batch does the whole job: a hook on every decoder projection
quantizes it the first time it is called, from the inputs it receives, and the projection then
computes with its quantized weight. So each layer's inputs come from the model running on its
own, already quantized, earlier layers (GPTQ's sequential scheme), and no activations are kept
beyond the current layer. With ``lm_head`` the output projection is quantized last, from the final
hidden states that pass gives (tied embeddings are untied first: the embedding table stays dense).
RTN needs no data and skips the pass.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from folovllm.attention.layer import prefill_metadata
from folovllm.config import ModelConfig
from folovllm.model_executor.layers.linear import Linear
from folovllm.model_executor.model_loader import LoadedModel, load_model
from folovllm.quantization.calibration import calibration_ids
from folovllm.quantization.gptq import HessianAccumulator, gptq_quantize
from folovllm.quantization.grid import QuantizedWeight, output_rows
from folovllm.quantization.packing import pack_gptq
from folovllm.quantization.rtn import check_quant_args, rtn_quantize

METHODS = ("gptq", "rtn")


def decoder_linears(model: nn.Module) -> dict[str, Linear]:
    """The projections GPTQ quantizes: every dense ``Linear`` of the decoder layers (not ``lm_head``)."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, Linear) and ".layers." in f".{name}" and m.quant_method is None
    }


@torch.no_grad()
def quantize_weights(
    model: nn.Module,
    method: str = "gptq",
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    desc_act: bool = False,
    calib: torch.Tensor | None = None,
    damp_percent: float = 0.01,
    progress: bool = True,
    lm_head: bool = False,
) -> dict[str, QuantizedWeight]:
    """Quantize every decoder projection of ``model`` in place (its weight becomes the dequantized one), and
    ``lm_head`` too if asked.

    ``calib [num_samples, seq_len]`` token ids drive GPTQ; the result maps module names to the
    quantized weights to pack.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_quant_args(bits, group_size)
    linears = decoder_linears(model)
    head = {"lm_head": untied_lm_head(model)} if lm_head else {}
    results: dict[str, QuantizedWeight] = {}
    bar = tqdm(total=len(linears) + len(head), desc=f"{method.upper()} {bits}-bit", file=sys.stderr, disable=not progress)

    def quantize(name: str, layer: Linear, x: torch.Tensor | None) -> None:
        if method == "rtn":
            qw = rtn_quantize(layer.weight, bits, group_size, sym)
        else:
            hessian = HessianAccumulator(layer.input_size, x.device)
            hessian.add_batch(x)
            qw = gptq_quantize(layer.weight, hessian.hessian, bits, group_size, sym, desc_act, damp_percent)
        layer.weight.copy_(qw.dequantize().to(layer.weight.dtype))
        results[name] = qw
        bar.update(1)

    if method == "rtn":
        for name, layer in (linears | head).items():
            quantize(name, layer, None)
    else:
        if calib is None:
            raise ValueError("GPTQ needs calibration token ids (calib)")
        hooks = [
            layer.register_forward_pre_hook(
                lambda layer, args, name=name: None if name in results else quantize(name, layer, args[0])
            )
            for name, layer in linears.items()
        ]
        try:
            device = next(model.parameters()).device
            ids = calib.to(device).reshape(-1)
            positions = torch.arange(calib.shape[1], device=device).repeat(calib.shape[0])
            hidden = model(ids, positions, prefill_metadata([calib.shape[1]] * calib.shape[0], device))
        finally:
            for hook in hooks:
                hook.remove()
        for name, layer in head.items():  # its input: the final norm's output, from the quantized decoder
            quantize(name, layer, hidden)
    bar.close()
    return results


def untied_lm_head(model: nn.Module) -> Linear:
    """``model.lm_head`` with a weight of its own: tied to the embeddings, quantizing it would change them too."""
    if model.tie_word_embeddings:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        model.tie_word_embeddings = False
    return model.lm_head


def quantized_state_dict(model: nn.Module, results: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    """Every tensor under HF's names; quantized projections as the four GPTQ tensors, merged ones split back."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    for hf_name, (name, shard) in model.checkpoint_layout().items():
        module_name, _, leaf = name.rpartition(".")
        rows = slice(None) if shard is None else modules[module_name].shard_rows(shard)
        if module_name in results and leaf == "weight":
            prefix = hf_name.rpartition(".")[0]
            for key, tensor in pack_gptq(output_rows(results[module_name], rows)).items():
                tensors[f"{prefix}.{key}"] = tensor
        else:
            tensors[hf_name] = params[name].data[rows]
    return {name: t.detach().cpu().clone() for name, t in tensors.items()}  # slices of one parameter share storage


def save_quantized(
    loaded: LoadedModel, results: dict[str, QuantizedWeight], quant_config: dict[str, Any], out_dir: str | Path
) -> Path:
    """Write ``model.safetensors``, ``config.json`` (with ``quantization_config``), ``quantize_config.json``
    and the tokenizer: a folder AutoGPTQ, GPTQModel, vLLM, transformers and we all read."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(quantized_state_dict(loaded.model, results), str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_config = copy.deepcopy(loaded.hf_config)
    hf_config.quantization_config = quant_config
    if quant_config.get("lm_head"):  # its own quantized tensors now, not the embedding table
        hf_config.tie_word_embeddings = False
    hf_config.save_pretrained(out)
    (out / "quantize_config.json").write_text(json.dumps(quant_config, indent=2) + "\n")
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(out)
    if loaded.path is not None and (loaded.path / "generation_config.json").is_file():
        shutil.copy(loaded.path / "generation_config.json", out / "generation_config.json")
    return out


def quantize_model(
    model: str,
    out_dir: str | Path,
    method: str = "gptq",
    bits: int = 4,
    group_size: int = 128,
    desc_act: bool = False,
    sym: bool = False,
    calib_samples: int = 32,
    calib_seq_len: int = 256,
    damp_percent: float = 0.01,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
    lm_head: bool = False,
) -> dict[str, Any]:
    """Load ``model`` (fp32 on CPU), quantize it (``lm_head`` too if asked), write the checkpoint; returns a
    summary."""
    check_quant_args(bits, group_size)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    start = time.perf_counter()
    loaded = load_model(ModelConfig(model=model, device=device or "cpu", dtype="float32", seed=seed))
    if loaded.quant_config is not None:
        raise ValueError(f"{model} is already quantized")
    calib = None
    if method == "gptq":
        calib = calibration_ids(loaded.tokenizer, loaded.hf_config.vocab_size, calib_samples, calib_seq_len, seed)
    results = quantize_weights(loaded.model, method, bits, group_size, sym, desc_act, calib, damp_percent, progress, lm_head)
    quant_config = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "damp_percent": damp_percent,
        "true_sequential": True,
        "static_groups": False,
        "lm_head": lm_head,
        "checkpoint_format": "gptq",
        "meta": {
            "quantizer": "folovllm",
            "method": method,
            "calib_samples": calib_samples if calib is not None else 0,
            "calib_seq_len": calib_seq_len if calib is not None else 0,
            "seed": seed,
        },
    }
    path = save_quantized(loaded, results, quant_config, out_dir)
    return {
        "out": str(path),
        "model": model,
        "method": method,
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "lm_head": lm_head,
        "layers": len(results),
        "calib_tokens": 0 if calib is None else calib.numel(),
        "seconds": time.perf_counter() - start,
        "checkpoint_bytes": sum(f.stat().st_size for f in path.glob("*.safetensors")),
    }
