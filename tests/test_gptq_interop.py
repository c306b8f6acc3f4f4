"""M7 interop with GPTQModel, the GPTQ library transformers delegates to (CPU; optional: ``make interop``).

Both ways:
- a checkpoint written by ``folovllm quantize`` loads in transformers (its GPTQ path: optimum, then
  GPTQModel's modules and CPU kernel) and, when symmetric, in ``GPTQModel.load``; the weights they read
  equal ours bit for bit and their model computes our logits;
- a checkpoint quantized and saved by GPTQModel itself (its GPTQ, its packer, act-order, asymmetric, with
  rows whose zero point is 0, with and without a 4-bit ``lm_head``) loads in our engine: same weights, same bytes
  when we pack them again, and HF's logits and greedy tokens on those weights;
- a 4-bit ``lm_head`` of ours loads in GPTQModel; transformers cannot serve one. GPTQModel's own quantized
  ``lm_head`` is 8-bit, given by a per-module override (``dynamic``), which our loader applies.

Skipped where GPTQModel is not installed (the project's venv and CI): ``make interop`` builds its own venv
from ``requirements-interop.txt`` and runs this file there.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

# GPTQModel 7.6 sizes its CPU pool (cores + 1) // 2 but asks it for 2 loader workers: on 2 cores it raises.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
gptqmodel = pytest.importorskip("gptqmodel", reason="GPTQModel is an optional test dependency: run `make interop`")
pytest.importorskip("optimum", reason="transformers' GPTQ path needs optimum: run `make interop`")

from gptqmodel import BACKEND, GPTQModel, QuantizeConfig  # noqa: E402
from gptqmodel.nn_modules.qlinear import BaseQuantLinear  # noqa: E402
from test_quantization import GREEDY, PROMPTS, hf_greedy_on, hf_with_weights, our_greedy, with_nonnegative_rows  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from folovllm.attention.layer import prefill_metadata  # noqa: E402
from folovllm.cli import main  # noqa: E402
from folovllm.config import ModelConfig  # noqa: E402
from folovllm.model_executor.layers.quantization.gptq import GPTQConfig  # noqa: E402
from folovllm.model_executor.model_loader import load_model  # noqa: E402
from folovllm.quantization.packing import pack_gptq, unpack_gptq, unpack_zeros  # noqa: E402

GROUP_SIZE = 32
SEQS = [torch.tensor(p) for p in PROMPTS]
# GPTQModel's CPU kernel (TorchAtenLinear: aten._weight_int4pack_mm_for_cpu) multiplies in bf16 (8 significant
# bits) whatever the model's dtype: measured 0.022 (GPTQ act-order) and 0.028 (RTN sym) of the largest logit
# over 2 layers, the argmax equal at 54 of 55 positions. The same weights in fp32: 2e-6 at most.
NATIVE_KERNEL_RTOL = 0.06
FP32_RTOL = 1e-4


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


def our_logits(folder) -> torch.Tensor:
    """Our model (fp32, the PyTorch reference kernel on CPU), every prompt in one flattened forward."""
    model = load_model(ModelConfig(model=str(folder), device="cpu", dtype="float32")).model
    lens = [len(s) for s in SEQS]
    with torch.no_grad():
        hidden = model(torch.cat(SEQS), torch.cat([torch.arange(n) for n in lens]), prefill_metadata(lens))
        return model.compute_logits(hidden)


def hf_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(s[None]).logits[0].float() for s in SEQS])


def module_settings(folder, prefix: str) -> GPTQConfig:
    """The bits and group size our loader gives checkpoint module ``prefix`` (``dynamic`` overrides applied)."""
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    return GPTQConfig.from_config(config).for_layer([prefix])


def read_by_us(folder) -> dict[str, np.ndarray]:
    """Our reader (``unpack_gptq``, the loader's unpacking) on every quantized layer: fp32 ``[out, in]`` by HF name."""
    tensors = load_file(str(folder / "model.safetensors"))
    weights = {}
    for prefix in (name.removesuffix(".qweight") for name in tensors if name.endswith(".qweight")):
        settings = module_settings(folder, prefix)
        stored = (tensors[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
        weights[f"{prefix}.weight"] = unpack_gptq(*stored, settings.bits, settings.group_size).dequantize().numpy()
    return weights


def read_by_gptqmodel(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """GPTQModel's own reading of every quantized module (``dequantize_weight``, after its v1 -> v2 zero-point
    conversion), with the fp16 scales widened to fp32 so nothing rounds: fp32 ``[out, in]`` by HF name.
    Call before the first forward: GPTQModel's CPU kernel repacks the module then."""
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseQuantLinear):
            scales = module.scales
            module.scales = scales.float()
            weights[f"{name}.weight"] = module.dequantize_weight().T.contiguous().numpy()
            module.scales = scales
    return weights


def assert_same_weights(theirs: dict[str, np.ndarray], ours: dict[str, np.ndarray], lm_head: bool = False) -> None:
    assert sorted(theirs) == sorted(ours) and len(ours) == 2 * 7 + lm_head  # every projection of both layers
    assert ("lm_head.weight" in ours) == lm_head
    for name, w in ours.items():
        assert np.array_equal(theirs[name], w), name


@pytest.mark.parametrize("method, extra", [("gptq", ["--desc-act"]), ("rtn", ["--sym"])])
def test_our_checkpoint_loads_in_transformers_and_gptqmodel(tiny_checkpoint, tmp_path, method, extra):
    src, q = tiny_checkpoint("llama"), tmp_path / "q"
    args = ["--method", method, "--group-size", str(GROUP_SIZE), "--calib-samples", "4", "--calib-seq-len", "32", *extra]
    assert main(["quantize", "--model", str(src), "--out", str(q), *args]) == 0
    ours = read_by_us(q)
    logits = our_logits(q)

    # transformers: config.json's quantization_config -> optimum -> GPTQModel's modules and CPU kernel
    hf = AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32)
    theirs = read_by_gptqmodel(hf)
    assert_same_weights(theirs, ours)
    assert {type(m).__name__ for m in hf.modules() if isinstance(m, BaseQuantLinear)} == {"TorchAtenLinear"}
    assert rel_err(hf_logits(hf), logits) < NATIVE_KERNEL_RTOL
    # the weights transformers read, multiplied in fp32: our logits and greedy tokens
    assert rel_err(hf_logits(hf_with_weights(src, theirs)), logits) < FP32_RTOL
    assert our_greedy(q, PROMPTS) == hf_greedy_on(src, theirs, PROMPTS, GREEDY.max_tokens)

    # GPTQModel.load: reads symmetric checkpoints from anyone, asymmetric "gptq" ones only from itself
    if "--sym" not in extra:
        with pytest.raises(ValueError, match="sym=False model with format=FORMAT.GPTQ is only supported if produced by"):
            GPTQModel.load(str(q), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
        return
    model = GPTQModel.load(str(q), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    assert_same_weights(read_by_gptqmodel(model.model), ours)


def test_our_lm_head_checkpoint_loads_in_gptqmodel_not_in_transformers(tiny_checkpoint, tmp_path):
    """``quantize --lm-head`` (``lm_head: true``, vLLM's ``lm_head_quantized``): GPTQModel reads the 4-bit
    ``lm_head`` as we do and computes our logits. transformers (optimum 2.3) quantizes decoder blocks only: it builds
    a dense ``lm_head``, ignores the packed tensors and initializes ``lm_head.weight`` at random, so it cannot serve
    such a checkpoint."""
    src, q = tiny_checkpoint("llama"), tmp_path / "q"
    args = ["--method", "rtn", "--sym", "--lm-head", "--group-size", str(GROUP_SIZE)]
    assert main(["quantize", "--model", str(src), "--out", str(q), *args]) == 0
    assert json.loads((q / "config.json").read_text())["quantization_config"]["lm_head"] is True
    ours = read_by_us(q)
    logits = our_logits(q)

    model = GPTQModel.load(str(q), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model
    assert isinstance(model.lm_head, BaseQuantLinear)
    theirs = read_by_gptqmodel(model)
    assert_same_weights(theirs, ours, lm_head=True)
    assert rel_err(hf_logits(model.float()), logits) < NATIVE_KERNEL_RTOL
    assert rel_err(hf_logits(hf_with_weights(src, theirs)), logits) < FP32_RTOL

    hf, info = AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32, output_loading_info=True)
    assert type(hf.lm_head) is torch.nn.Linear and "lm_head.weight" in info["missing_keys"]


@pytest.mark.parametrize("lm_head", [False, True])
def test_gptqmodel_checkpoint_loads_in_ours(tiny_checkpoint, tmp_path, monkeypatch, lm_head):
    src, q = with_nonnegative_rows(tiny_checkpoint("llama"), tmp_path / "dense"), tmp_path / "q"
    monkeypatch.chdir(tmp_path)  # GPTQModel's quantizer writes a log folder into the working directory
    config = QuantizeConfig(bits=4, group_size=GROUP_SIZE, desc_act=True, sym=False, lm_head=lm_head)
    model = GPTQModel.load(str(src), config, device="cpu")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (8, 1, 32), generator=gen)
    model.quantize([{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids], batch_size=1)
    model.save(str(q))
    del model
    written = json.loads((q / "config.json").read_text())["quantization_config"]
    assert (written["checkpoint_format"], written["sym"], written["desc_act"], written["lm_head"]) == (
        "gptq", False, True, lm_head
    )  # fmt: skip
    assert written["meta"]["quantizer"] == [f"gptqmodel:{gptqmodel.__version__}"]

    # GPTQModel quantizes lm_head at 8 bits, symmetric, in natural order: a per-module override we read
    assert written.get("dynamic", {}).get("lm_head", {}).get("bits") == (8 if lm_head else None)
    tensors = load_file(str(q / "model.safetensors"))
    ours = read_by_us(q)
    for name in ours:
        prefix = name.removesuffix(".weight")
        stored = {k: tensors[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        settings = module_settings(q, prefix)
        assert settings.bits == (8 if prefix == "lm_head" else 4)
        qw = unpack_gptq(**stored, bits=settings.bits, group_size=settings.group_size)
        # act-order: a permutation of groups (GPTQModel 7.6 quantizes lm_head in natural order even with desc_act)
        assert torch.equal(qw.g_idx, qw.g_idx.sort().values) == (name == "lm_head.weight")
        for key, t in pack_gptq(qw).items():  # what we read, packed again: GPTQModel's bytes
            assert torch.equal(t, stored[key]), (name, key)
    decoder = [n for n in ours if n != "lm_head.weight"]
    assert all(
        (unpack_zeros(tensors[f"{n.removesuffix('.weight')}.qzeros"], 4, ours[n].shape[0]) == 0).any() for n in decoder
    )

    theirs = read_by_gptqmodel(GPTQModel.load(str(q), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model)
    assert_same_weights(theirs, ours, lm_head)
    # HF on GPTQModel's weights, with the unquantized tensors as GPTQModel saved them (it quantized in bf16)
    weights = {
        name: t.float().numpy() for name, t in tensors.items() if not name.endswith(("qweight", "qzeros", "scales", "g_idx"))
    }
    weights.update(theirs)
    assert rel_err(our_logits(q), hf_logits(hf_with_weights(src, weights))) < FP32_RTOL
    assert our_greedy(q, PROMPTS) == hf_greedy_on(src, weights, PROMPTS, GREEDY.max_tokens)
