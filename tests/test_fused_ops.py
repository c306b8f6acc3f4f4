"""The fused Triton kernels of M4 part 2 against the plain-PyTorch layers they replace.

On CPU they run under Triton's interpreter (fp32, so they must agree to rounding);
with CUDA the same tests run the compiled kernels in bf16 as well.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from folovllm.attention.backends.abstract import store_kv_reference  # noqa: E402
from folovllm.attention.layer import prefill_metadata  # noqa: E402
from folovllm.config import ModelConfig  # noqa: E402
from folovllm.model_executor.layers.activation import SiluAndMul  # noqa: E402
from folovllm.model_executor.layers.custom_op import enable_fused_ops  # noqa: E402
from folovllm.model_executor.layers.layernorm import RMSNorm  # noqa: E402
from folovllm.model_executor.layers.ops.activation import silu_and_mul  # noqa: E402
from folovllm.model_executor.layers.ops.rms_norm import rms_norm  # noqa: E402
from folovllm.model_executor.layers.ops.rotary import rotary_qk_  # noqa: E402
from folovllm.model_executor.layers.rotary_embedding import RotaryEmbedding  # noqa: E402
from folovllm.model_executor.model_loader import load_model  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 80])
def test_rms_norm_with_and_without_residual(dtype, hidden):
    norm = RMSNorm(hidden, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(rand(hidden, seed=1) * 0.5 + 1)
    norm = norm.to(dtype)
    x, res = rand(7, hidden, dtype=dtype, seed=2), rand(7, hidden, dtype=dtype, seed=3)
    torch.testing.assert_close(rms_norm(x, norm.weight, 1e-5), norm.forward_native(x), **TOL[dtype])
    ref_out, ref_res = norm.forward_native(x, res)
    residual = res.clone()
    out, new_res = rms_norm(x, norm.weight, 1e-5, residual)
    assert new_res is residual  # updated in place: the running residual stream
    torch.testing.assert_close(new_res, ref_res, **TOL[dtype])
    torch.testing.assert_close(out, ref_out, **TOL[dtype])


def test_rms_norm_reads_strided_rows_and_refuses_a_bad_residual():
    wide = rand(5, 96)
    x = wide[:, 16:80]  # rows 96 apart
    w = rand(64, seed=4)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), RMSNorm(64).to(DEVICE)._norm(x) / 1 * w, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match=r"residual must be a contiguous \(5, 64\) tensor"):
        rms_norm(x, w, 1e-6, rand(5, 32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [48, 1500])
def test_silu_and_mul(dtype, inter):
    x = rand(3, 2 * inter, dtype=dtype)
    torch.testing.assert_close(silu_and_mul(x), SiluAndMul().forward_native(x), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rotary_in_place_matches_norm_then_rope(dtype, qk_norm):
    heads, kv_heads, head_dim, tokens = 4, 2, 32, 6
    rope = RotaryEmbedding(head_dim, 64, {"rope_type": "default", "rope_theta": 10000.0}).to(DEVICE)
    norms = [RMSNorm(head_dim).to(DEVICE) for _ in "qk"] if qk_norm else [None, None]
    for i, n in enumerate(norms):
        if n is not None:
            with torch.no_grad():
                n.weight.copy_(rand(head_dim, seed=10 + i) * 0.3 + 1)
            n.to(dtype)
    qkv = rand(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=5)
    positions = torch.tensor([0, 3, 9, 17, 40, 63], device=DEVICE)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    ref_q, ref_k = rope.forward_native(positions, q.clone(), k.clone(), rope.cos_sin(positions, dtype), *norms)
    rotary_qk_(q, k, positions, rope.cos_sin_cache, *(None if n is None else n.weight for n in norms))
    torch.testing.assert_close(q, ref_q, **TOL[dtype])
    torch.testing.assert_close(k, ref_k, **TOL[dtype])
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_writes_rotated_k_and_v_into_their_cache_slots(dtype):
    """The K/V store fused behind RoPE: the cache ends as the backend's store would leave it."""
    heads, kv_heads, head_dim, block_size = 4, 2, 32, 4
    rope = RotaryEmbedding(head_dim, 64, {"rope_type": "default", "rope_theta": 10000.0}).to(DEVICE)
    qkv = rand(5, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=6)
    q = qkv[:, : heads * head_dim].view(5, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(5, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(5, kv_heads, head_dim)
    positions = torch.tensor([0, 7, 2, 30, 63], device=DEVICE)
    slots = torch.tensor([3, 17, -1, 8, 22], device=DEVICE)  # -1: a padding token
    cache = rand(2, 6, block_size, kv_heads, head_dim, dtype=dtype, seed=7)
    ref_q, ref_k = rope.forward_native(positions, q.clone(), k.clone(), rope.cos_sin(positions, dtype))
    ref_cache = cache.clone()
    keep = slots >= 0
    store_kv_reference(ref_k[keep], v[keep], ref_cache, slots[keep])
    rotary_qk_(q, k, positions, rope.cos_sin_cache, v=v, kv_cache=cache, slot_mapping=slots)
    torch.testing.assert_close((q, k), (ref_q, ref_k), **TOL[dtype])
    torch.testing.assert_close(cache, ref_cache, **TOL[dtype])  # slot 3's neighbours and the rest untouched


def test_rotary_refuses_a_partial_store():
    q, k, v = rand(2, 4, 16), rand(2, 2, 16), rand(2, 2, 16)
    cache = torch.zeros(8, 16, device=DEVICE)
    pos = torch.zeros(2, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="v, kv_cache and slot_mapping go together"):
        rotary_qk_(q, k, pos, cache, v=v, kv_cache=torch.zeros(2, 1, 4, 2, 16, device=DEVICE))
    with pytest.raises(ValueError, match=r"v must be shaped like k \(2, 2, 16\)"):
        rotary_qk_(q, k, pos, cache, v=rand(2, 2, 8), kv_cache=torch.zeros(2, 1, 4, 2, 16, device=DEVICE), slot_mapping=pos)
    with pytest.raises(ValueError, match=r"kv_cache must be a contiguous \[2, blocks, block_size, 2, 16\] tensor"):
        rotary_qk_(q, k, pos, cache, v=v, kv_cache=torch.zeros(2, 1, 4, 16, 2, device=DEVICE), slot_mapping=pos)


def test_fused_rope_takes_the_kv_store_from_the_backend(monkeypatch):
    """With fused ops each layer's K/V reach the cache inside the RoPE launch: the backend's store runs
    for no layer, and the logits and the cache equal the unfused model's (which stores in the backend)."""
    from folovllm.attention.backends.triton_paged import TritonPagedAttentionBackend
    from folovllm.attention.layer import bind_attention

    config = ModelConfig(model="random:tiny-qwen3", device=DEVICE, dtype="float32")
    model = load_model(config).model
    layers = model.attention_layers()
    spec = layers[0]
    ids = torch.tensor([5, 9, 100, 3, 7, 42, 8], device=DEVICE)
    pos = torch.tensor([0, 1, 2, 3, 0, 1, 2], device=DEVICE)
    md = prefill_metadata([4, 3], DEVICE)
    md.block_table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32, device=DEVICE)
    md.slot_mapping = torch.tensor([8, 9, 10, 11, 4, 5, 6], device=DEVICE)
    md.block_size = 4
    stores = []
    monkeypatch.setattr(TritonPagedAttentionBackend, "store_kv", lambda self, *a: stores.append(a) or store_kv_reference(*a))

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        caches = [torch.zeros(2, 4, 4, spec.num_kv_heads, spec.head_dim, device=DEVICE) for _ in layers]
        bind_attention(layers, TritonPagedAttentionBackend(), caches)
        with torch.inference_mode():
            return model.compute_logits(model(ids, pos, md)), caches

    ref_logits, ref_caches = run()
    assert len(stores) == len(layers)
    enable_fused_ops(model)
    logits, caches = run()
    assert len(stores) == len(layers)  # none more
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(caches, ref_caches, atol=1e-5, rtol=1e-5)


def test_rotary_refuses_mismatched_norms_and_scattered_heads():
    q, k = rand(2, 4, 16), rand(2, 2, 16)
    cache = torch.zeros(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="q_norm_weight and k_norm_weight go together"):
        rotary_qk_(q, k, torch.zeros(2, dtype=torch.long, device=DEVICE), cache, torch.ones(16, device=DEVICE))
    with pytest.raises(ValueError, match="q and k must hold each token's heads contiguously"):
        rotary_qk_(q.transpose(0, 1), k, torch.zeros(2, dtype=torch.long, device=DEVICE), cache)


@pytest.mark.parametrize("preset, num_ops", [("tiny-llama", 17), ("tiny-qwen3", 21)])
def test_whole_model_with_fused_ops_matches_native(preset, num_ops):
    """Per layer: two norms, the MLP activation and four projections (+ Qwen3's q/k norms); the final norm; the
    shared RoPE; the LM head. On CPU the projections have no tuned skinny plan and stay `F.linear`."""
    config = ModelConfig(model=f"random:{preset}", device=DEVICE, dtype="float32")
    model = load_model(config).model
    ids = torch.tensor([5, 9, 100, 3, 7, 42, 8], device=DEVICE)
    pos = torch.tensor([0, 1, 2, 3, 0, 1, 2], device=DEVICE)
    md = prefill_metadata([4, 3], DEVICE)
    with torch.inference_mode():
        ref = model.compute_logits(model(ids, pos, md))
        assert enable_fused_ops(model) == num_ops
        got = model.compute_logits(model(ids, pos, md))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
