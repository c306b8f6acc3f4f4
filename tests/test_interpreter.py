"""CPU launches of Triton kernels, both ways a process can reach the interpreter.

The test session runs with ``TRITON_INTERPRET=1`` (``conftest.py``), Triton's supported switch. A
process that imported Triton for compiling first must still run kernels on CPU tensors, through
the per-launch fallback; that is checked in a fresh interpreter without the variable.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from folovllm.triton_utils import for_device  # noqa: E402
from folovllm.triton_utils.interpreter import _Interpreted  # noqa: E402

SCRIPT = textwrap.dedent("""
    import torch, triton, triton.language as tl
    from triton.runtime.jit import JITFunction
    from folovllm.attention.backends.triton_paged import TritonPagedAttentionBackend
    from folovllm.attention.backends.naive import NaiveAttentionBackend
    from folovllm.attention.ops.triton_paged_attn import _paged_attention_kernel
    from folovllm.triton_utils import for_device
    assert isinstance(_paged_attention_kernel, JITFunction)  # compiled-only kernels
    assert for_device(_paged_attention_kernel, torch.device("cuda")) is _paged_attention_kernel
    from test_triton_attention import make_batch
    before = dict(vars(tl))
    q, k, v, cache, md = make_batch([1, 3], [9, 3], 4, 2, 16, 8, dtype=torch.bfloat16, device=torch.device("cpu"))
    out_t = TritonPagedAttentionBackend().forward(q, k, v, cache.clone(), md, 0.3)
    out_n = NaiveAttentionBackend().forward(q, k, v, cache.clone(), md, 0.3)
    torch.testing.assert_close(out_t.float(), out_n.float(), atol=3e-2, rtol=0)
    assert all(vars(tl).get(n) is v for n, v in before.items()), "triton.language restored"
    # a kernel calling a @triton.jit helper of its own module (RoPE's _rope_heads)
    import folovllm.model_executor.layers.ops.rotary as rotary
    from folovllm.model_executor.layers.rotary_embedding import RotaryEmbedding
    helper = rotary._rope_heads
    rope = RotaryEmbedding(16, 32, {"rope_type": "default", "rope_theta": 10000.0})
    q, k, pos = torch.randn(3, 4, 16), torch.randn(3, 2, 16), torch.tensor([0, 5, 31])
    ref_q, ref_k = rope.forward_native(pos, q.clone(), k.clone(), rope.cos_sin(pos, q.dtype), None, None)
    rotary.rotary_qk_(q, k, pos, rope.cos_sin_cache)
    torch.testing.assert_close((q, k), (ref_q, ref_k))
    assert rotary._rope_heads is helper, "the module's helper restored"
    print("ok")
""")


def test_session_uses_tritons_own_interpreter_switch():
    from triton.runtime.interpreter import InterpretedFunction

    from folovllm.attention.ops.triton_paged_attn import _store_kv_kernel

    if torch.cuda.is_available():
        pytest.skip("with a GPU the kernels compile")
    assert os.environ["TRITON_INTERPRET"] == "1"
    assert isinstance(_store_kv_kernel, InterpretedFunction)
    launcher = for_device(_store_kv_kernel, torch.device("cpu"))
    assert isinstance(launcher, _Interpreted) and launcher.native


def test_compiled_mode_process_falls_back_per_launch():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


@triton.jit
def _bf16_arithmetic_kernel(A, B, Out, I, IOut, N: tl.constexpr):
    r = tl.arange(0, N)
    a, b = tl.load(A + r), tl.load(B + r)
    tl.store(Out + r, a - b)
    tl.store(Out + N + r, a + b)
    tl.store(Out + 2 * N + r, a * b)
    i = tl.load(I + r)
    tl.store(IOut + r, i - 3 * i + 7)


def test_interpreter_computes_bf16_arithmetic_on_values_not_bits():
    """Triton 3.6's interpreter keeps bf16 as raw uint16 and its ``+ - *`` acted on the bits (``128 + q`` minus
    ``128 + z`` came out NaN); patched to compute in fp32 and round to the nearest bf16, ties to even, as the GPU
    rounds and torch does. Integer arithmetic is left alone. (``/`` is not here: Triton divides bf16 in fp32,
    and the interpreter's cast back to bf16 truncates, one unit in the last place off torch at most.)"""
    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(64, generator=gen) * 100).to(torch.bfloat16)
    b = (torch.randn(64, generator=gen) * 3 + 0.5).to(torch.bfloat16)
    a[:4] = torch.tensor([131.0, 128.0, 1.0, 3.0])  # 128 + q, 128 + z, and a sum that ties: 1 + 2^-8 -> 1
    b[:4] = torch.tensor([136.0, 140.0, 2.0**-8, -7.0])
    i = torch.arange(64, dtype=torch.int32) - 32
    out, i_out = torch.empty(3 * 64, dtype=torch.bfloat16), torch.empty(64, dtype=torch.int32)
    for_device(_bf16_arithmetic_kernel, torch.device("cpu"))[(1,)](a, b, out, i, i_out, 64)
    want = torch.cat([a - b, a + b, a * b])
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))
    assert out[:2].tolist() == [-5.0, -12.0] and out[64 + 2].item() == 1.0
    assert torch.equal(i_out, i - 3 * i + 7)
