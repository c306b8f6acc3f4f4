"""The skinny GEMM (M4 fast path): equal to ``F.linear``, replayable, used only where a sweep measured it faster.

On CPU the kernel runs under Triton's interpreter; on a GPU, compiled.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from folovllm.model_executor.layers import linear as linear_mod  # noqa: E402
from folovllm.model_executor.layers.custom_op import enable_fused_ops  # noqa: E402
from folovllm.model_executor.layers.ops import skinny_gemm as sk  # noqa: E402
from folovllm.triton_utils.tuned import TunedTable  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def operands(m: int, k: int, n: int, bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(DTYPE).to(DEVICE)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(DTYPE).to(DEVICE)
    b = torch.randn(n, generator=gen).to(DTYPE).to(DEVICE) if bias else None
    return x, w, b


@pytest.mark.parametrize(
    "m, k, n, plan, bias",
    [
        (1, 256, 48, sk.SkinnyPlan(8, 256, 4), False),  # one split, whole tiles
        (3, 300, 37, sk.SkinnyPlan(8, 128, 4), True),  # three splits, K and N not multiples of the tile
        (4, 1024, 20, sk.SkinnyPlan(4, 256, 8), False),  # four splits
        (2, 96, 5, sk.SkinnyPlan(16, 128, 4), True),  # N smaller than one tile
    ],
)
def test_skinny_gemm_equals_f_linear(m, k, n, plan, bias):
    x, w, b = operands(m, k, n, bias)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    got = sk.skinny_gemm(x, w, b, plan)
    assert got.dtype == x.dtype and got.shape == (m, n)
    tol = 1e-5 if DTYPE == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)
    again = sk.skinny_gemm(x, w, b, plan)  # the split-K counters were left at zero for the next launch
    assert torch.equal(got, again)


def test_skinny_gemm_refuses_what_it_cannot_multiply():
    x, w, _ = operands(5, 64, 8, False)
    with pytest.raises(ValueError, match=r"skinny_gemm needs x \[<= 4, K\] and weight \[N, K\] with contiguous rows"):
        sk.skinny_gemm(x, w, None, sk.SkinnyPlan(8, 64, 4))
    with pytest.raises(ValueError, match="got \\(2, 64\\) and \\(64, 8\\)"):
        sk.skinny_gemm(x[:2], w.t(), None, sk.SkinnyPlan(8, 64, 4))


def test_the_weight_tile_keeps_its_layout():
    """The removed first version multiplied an ``[M, N, K]`` broadcast, and Triton moved every weight tile
    through shared memory. Compiled for sm_90 on this machine: the only layout changes are of the x slice
    and of the ``[BLOCK_N]`` result (1-D), never of the 2-D weight tile, and there is no loop."""
    asm = sk.compile_skinny(sk.SkinnyPlan(8, 1024, 4), k=2048)
    converts = [line for line in asm["ttgir"].splitlines() if "ttg.convert_layout" in line]
    assert converts and not any(re.search(r"tensor<\d+x\d+x", line) for line in converts)
    assert "scf.for" not in asm["ttgir"]


def test_sweep_plans_cover_every_k_in_a_few_splits():
    for k in (1024, 2048, 3072, 4096):
        plans = sk.sweep_skinny_plans(k)
        assert plans and all(1 <= p.split_k(k) <= 8 and p.block_n * p.block_k <= 16384 for p in plans)
    assert len(set(sk.sweep_skinny_plans(2048))) == len(sk.sweep_skinny_plans(2048))


def test_no_tuned_plan_means_cublas(tmp_path, monkeypatch):
    """Without a tuned table for this GPU model (and always on CPU) the fast path keeps ``F.linear``; a
    table written by a sweep is read back by shape."""
    assert sk.plan_skinny_gemm(1, 1024, 2048, torch.bfloat16, torch.device("cpu")) is None
    monkeypatch.setattr(sk, "TUNED", TunedTable(tmp_path, "skinny_gemm", sk.SkinnyPlan))
    assert sk.TUNED.plans("Some GPU") == {}
    path = sk.write_tuned_plans("Some GPU", {sk.tuned_key(1, 64, 8): {"block_n": 8, "block_k": 64, "num_warps": 4}},
                                {"commit": "test"})  # fmt: skip
    assert path == tmp_path / "skinny_gemm_Some_GPU.json"
    assert json.loads(path.read_text())["source"] == {"commit": "test"}
    assert sk.TUNED.plans("Some GPU") == {"m=1,k=64,n=8": sk.SkinnyPlan(8, 64, 4)}  # read again after the write


def test_linear_takes_the_skinny_gemm_only_on_the_fast_path_and_only_with_a_plan(monkeypatch):
    layer = linear_mod.Linear(64, 24, bias=True).to(DEVICE, DTYPE)
    with torch.no_grad():
        layer.weight.copy_(operands(1, 64, 24, False)[1])
        layer.bias.normal_()
    x = operands(2, 64, 24, False, seed=1)[0]
    calls = []

    def planned(m, k, n, dtype, device):
        calls.append((m, k, n))
        return sk.SkinnyPlan(8, 32, 4)

    monkeypatch.setattr(linear_mod, "plan_skinny_gemm", planned)
    with torch.no_grad():
        native = layer(x)
        assert calls == []  # M3 and earlier: F.linear, no plan asked
        enable_fused_ops(layer)
        fused = layer(x)
    assert calls == [(2, 64, 24)]
    tol = 1e-5 if DTYPE == torch.float32 else 2e-2
    torch.testing.assert_close(fused.float(), native.float(), atol=tol, rtol=tol)
    monkeypatch.setattr(linear_mod, "plan_skinny_gemm", lambda *args: None)
    with torch.no_grad():
        assert torch.equal(layer(x), native)


def test_bench_gemm_keeps_only_plans_that_beat_cublas_and_refuses_bad_arguments(capsys):
    from folovllm.benchmarks.gemm import best_plans, projection_shapes
    from folovllm.cli import main

    assert projection_shapes("qwen3-0.6b") == {
        "qkv_proj": (1024, 4096), "o_proj": (2048, 1024), "gate_up_proj": (1024, 6144), "down_proj": (3072, 1024),
        "lm_head": (1024, 151936),
    }  # fmt: skip
    plan = {"block_n": 8, "block_k": 1024, "num_warps": 4}
    rows = [
        {"m": 1, "k": 2048, "n": 1024, "plan": plan, "skinny_us": 5.0, "speedup": 2.5, "max_rel_err": 1e-3},
        {"m": 1, "k": 2048, "n": 1024, "plan": plan | {"num_warps": 8}, "skinny_us": 6.0, "speedup": 2.1,
         "max_rel_err": 1e-3},
        {"m": 1, "k": 1024, "n": 4096, "plan": plan, "skinny_us": 5.0, "speedup": 1.02, "max_rel_err": 1e-3},  # noise
        {"m": 2, "k": 1024, "n": 4096, "plan": plan, "skinny_us": 1.0, "speedup": 9.0, "max_rel_err": 0.5},  # wrong
        {"m": 4, "k": 1024, "n": 4096, "plan": plan, "error": "out of registers"},
    ]  # fmt: skip
    assert best_plans(rows) == {"m=1,k=2048,n=1024": plan}
    assert best_plans([rows[0] | {"m": 2}]) == {}  # one row only
    assert main(["bench", "gemm", "--m", "8"]) != 0
    assert "m must be row counts in [1, 4] (the skinny GEMM's range), got [8]" in capsys.readouterr().err
    assert main(["bench", "gemm", "--device", "cpu"]) != 0
    assert "bench gemm times Triton against cuBLAS and needs a CUDA device, got cpu" in capsys.readouterr().err
    assert main(["bench", "gemm", "--model", "random:nope", "--device", "cuda"]) != 0
    assert "model must be random:<preset> with a preset in" in capsys.readouterr().err


def test_cublas_only_turns_the_tuned_table_off_and_back_on(tmp_path, monkeypatch):
    table = TunedTable(tmp_path, "skinny_gemm", sk.SkinnyPlan)
    monkeypatch.setattr(sk, "TUNED", table)
    table.write("Some GPU", {sk.tuned_key(1, 64, 8): {"block_n": 8, "block_k": 64, "num_warps": 4}}, {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    cuda = torch.device("cuda")
    sk.plan_skinny_gemm.cache_clear()
    assert sk.plan_skinny_gemm(1, 64, 8, torch.bfloat16, cuda) == sk.SkinnyPlan(8, 64, 4)
    assert sk.plan_skinny_gemm(1, 64, 8, torch.float32, cuda) is None  # fp32 stays on cuBLAS
    table.write("Some GPU", {sk.tuned_key(m, 64, 8): {"block_n": 8, "block_k": 64, "num_warps": 4} for m in (1, 4)}, {})
    sk.plan_skinny_gemm.cache_clear()
    assert sk.plan_skinny_gemm(4, 64, 8, torch.bfloat16, cuda) is None  # graph (padded) and eager rows agree
    with sk.cublas_only():
        assert sk.plan_skinny_gemm(1, 64, 8, torch.bfloat16, cuda) is None
    assert sk.plan_skinny_gemm(1, 64, 8, torch.bfloat16, cuda) == sk.SkinnyPlan(8, 64, 4)
    sk.plan_skinny_gemm.cache_clear()


@pytest.mark.parametrize("m, k, n, plan", [(1, 300, 37, sk.SkinnyPlan(8, 128, 4)), (2, 256, 48, sk.SkinnyPlan(8, 256, 4))])
@pytest.mark.parametrize("with_residual", [True, False])
def test_norm_prologue_equals_the_norm_kernel_then_the_gemm(m, k, n, plan, with_residual):
    """Same roundings as ``rms_norm`` then ``skinny_gemm``: the same values, bit for bit; the old residual
    is left as it was and the new one is ``x + residual``."""
    from folovllm.model_executor.layers.ops.rms_norm import rms_norm

    x, w, b = operands(m, k, n, True, seed=2)
    residual, norm_weight = operands(m, k, 1, False, seed=3)[0], 1 + 0.1 * operands(1, k, 1, False, seed=4)[0][0]
    before = residual.clone()
    if with_residual:
        hidden, want_residual = rms_norm(x, norm_weight, 1e-6, residual.clone())
    else:
        hidden, want_residual = rms_norm(x, norm_weight, 1e-6), x
    got, new_residual = sk.skinny_gemm_rms_norm(x, residual if with_residual else None, norm_weight, 1e-6, w, b, plan)
    assert torch.equal(got, sk.skinny_gemm(hidden, w, b, plan)) and torch.equal(new_residual, want_residual)
    assert torch.equal(residual, before)


def test_silu_mul_prologue_equals_the_activation_kernel_then_the_gemm():
    from folovllm.model_executor.layers.ops.activation import silu_and_mul

    gate_up, w, b = operands(1, 2 * 300, 37, True, seed=5)
    w = w[:, :300].contiguous()
    plan = sk.SkinnyPlan(8, 128, 4)
    assert torch.equal(sk.skinny_gemm_silu_mul(gate_up, w, b, plan), sk.skinny_gemm(silu_and_mul(gate_up), w, b, plan))
    with pytest.raises(ValueError, match=r"got \(1, 600\) and \(37, 600\)"):
        sk.skinny_gemm_silu_mul(gate_up, operands(1, 600, 37, False)[1], None, plan)


def test_fused_prologues_keep_the_weight_tile_layout():
    """Compiled for sm_90: the prologues add loads of the input row, never a layout change of the weight tile."""
    for prologue in (sk.RMS_NORM, sk.SILU_MUL):
        asm = sk.compile_skinny(sk.SkinnyPlan(8, 1024, 4), k=2048, prologue=prologue)
        converts = [line for line in asm["ttgir"].splitlines() if "ttg.convert_layout" in line]
        assert not any(re.search(r"tensor<\d+x\d+x", line) for line in converts) and "scf.for" not in asm["ttgir"]


def test_a_decoder_with_fused_prologues_equals_the_native_one(monkeypatch):
    """Qwen3 on the fast path with a plan for every projection at one row: the decoder norms and SiLU·mul run
    inside the GEMMs (only the final norm keeps its own launch) and the logits equal the native model's."""
    from folovllm.attention.layer import prefill_metadata
    from folovllm.config import ModelConfig
    from folovllm.model_executor.layers.ops import activation, rms_norm
    from folovllm.model_executor.model_loader import load_model

    model = load_model(ModelConfig(model="random:tiny-qwen3", device=DEVICE, dtype="float32")).model
    ids, pos = torch.tensor([5], device=DEVICE), torch.tensor([0], device=DEVICE)
    md = prefill_metadata([1], DEVICE)
    monkeypatch.setattr(linear_mod, "plan_skinny_gemm", lambda m, k, n, dtype, device: sk.SkinnyPlan(16, 64, 4))
    launches = []
    for module, name in ((rms_norm, "rms_norm"), (activation, "silu_and_mul")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **kw: launches.append(_name) or _real(*a, **kw))
    with torch.inference_mode():
        ref = model.compute_logits(model(ids, pos, md))
        enable_fused_ops(model)
        got = model.compute_logits(model(ids, pos, md))
    assert launches == ["rms_norm"]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
