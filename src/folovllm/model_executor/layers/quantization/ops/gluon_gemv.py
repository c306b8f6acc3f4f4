"""PROTOTYPE: W4A16 decode with mma.sync, warps splitting K inside a program, words straight from global memory."""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from folovllm.model_executor.layers.quantization.ops.gluon_gptq import _CONSTRAINTS, PER_ASM, _byte_perm_asm
from folovllm.model_executor.layers.quantization.ops.triton_gptq import PER_CHANNEL
from folovllm.utils import cdiv


@gluon.jit
def gptq_decode_mma_kernel(QW, Scales, Zeros, X, Out, M, N, K, stride,
                           GROUP_SIZE: gl.constexpr, BLOCK_N: gl.constexpr, W: gl.constexpr,
                           M_TILE: gl.constexpr, EVEN: gl.constexpr):  # fmt: skip
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1, 1], instr_shape=[1, 16, 8])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    z_l: gl.constexpr = gl.SliceLayout(2, a_l)
    s_l: gl.constexpr = gl.SliceLayout(2, mma)
    n0 = gl.program_id(0) * BLOCK_N
    total = gl.cdiv(K, 128)
    last_group = (K - 1) // GROUP_SIZE
    # words [W, BLOCK_N, 16]: warp w's block, column n, word row t
    aw = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, a_l)))[:, None, None]
    an = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, gl.SliceLayout(2, a_l)))[None, :, None]
    at = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, a_l)))[None, None, :]
    w_ptr = QW + (aw * stride * 16 + at) * N + an
    w_ok = (aw * stride < total) & (an < N)
    # zero points [W, BLOCK_N] (operand layout) and scales (product layout) of warp w's group
    zw = gl.arange(0, W, layout=gl.SliceLayout(1, z_l))[:, None]
    zn = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, z_l))[None, :]
    sw = gl.arange(0, W, layout=gl.SliceLayout(1, s_l))[:, None]
    sn = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_l))[None, :]
    # X [W, 16, M_TILE]: warp w's block, row t of slice j, row m of X
    bw = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, b_l)))[:, None, None]
    bt = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, b_l)))[None, :, None]
    bm = gl.arange(0, M_TILE, layout=gl.SliceLayout(0, gl.SliceLayout(1, b_l)))[None, None, :]
    x_ptr = X + bm * K + bw * stride * 128 + bt
    x_ok = bm < M
    acc = gl.zeros([W, BLOCK_N, M_TILE], gl.float32, mma)
    words_n = gl.load(w_ptr, mask=w_ok, other=0)
    z_n = gl.load(Zeros + gl.minimum(zw * stride * 128 // GROUP_SIZE, last_group) * N + zn, mask=zn < N, other=0.0)
    s_n = gl.load(Scales + gl.minimum(sw * stride * 128 // GROUP_SIZE, last_group) * N + sn, mask=sn < N, other=0.0)
    xs_n = ()
    for j in gl.static_range(8):
        xs_n = xs_n + (gl.load(x_ptr + j * 16, mask=x_ok & (bw * stride < total), other=0.0),)
    for i in range(stride):
        words = words_n
        z = z_n
        sc = s_n
        xs = xs_n
        w_ptr += 16 * N
        x_ptr += 128
        nxt = (aw * stride + i + 1 < total) & (i + 1 < stride)
        words_n = gl.load(w_ptr, mask=w_ok & nxt, other=0)
        g_z = gl.minimum((zw * stride + i + 1) * 128 // GROUP_SIZE, last_group)
        g_s = gl.minimum((sw * stride + i + 1) * 128 // GROUP_SIZE, last_group)
        z_n = gl.load(Zeros + g_z * N + zn, mask=zn < N, other=0.0)
        s_n = gl.load(Scales + g_s * N + sn, mask=sn < N, other=0.0)
        x_nxt = (bw * stride + i + 1 < total) & (i + 1 < stride)
        xs_n = ()
        for j in gl.static_range(8):
            xs_n = xs_n + (gl.load(x_ptr + j * 16, mask=x_ok & x_nxt, other=0.0),)
        offs = (128.0 + z.to(gl.float32)).to(gl.bfloat16)[:, :, None] + gl.zeros([W, BLOCK_N, 16], gl.bfloat16, a_l)
        part = gl.zeros([W, BLOCK_N, M_TILE], gl.float32, mma)
        for q in gl.static_range(8 // PER_ASM):
            codes = gl.inline_asm_elementwise(_byte_perm_asm(4, q), _CONSTRAINTS, [words, offs],
                                              dtype=(gl.bfloat16,) * PER_ASM, is_pure=True, pack=2)  # fmt: skip
            for c in gl.static_range(PER_ASM):
                part = mma_v2(codes[c], xs[q * PER_ASM + c], part)
        acc += part * sc.to(gl.float32)[:, :, None]
    out = gl.sum(acc, axis=0)
    o_l: gl.constexpr = gl.SliceLayout(0, mma)
    rn = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, o_l))[:, None]
    rm = gl.arange(0, M_TILE, layout=gl.SliceLayout(0, o_l))[None, :]
    gl.store(Out + rm * N + rn, out.to(gl.bfloat16), mask=(rn < N) & (rm < M))


def _constexprs(k, n, block_n, w, m_tile, group_size):
    even = cdiv(k, 128) % w == 0 and k % 128 == 0 and n % block_n == 0
    return dict(GROUP_SIZE=PER_CHANNEL if group_size == -1 else group_size, BLOCK_N=block_n, W=w, M_TILE=m_tile,
                EVEN=even)


def compile_mma(block_n=16, w=8, m_tile=8, maxnreg=None, even=True):
    from folovllm.triton_utils.offline_compile import compile_for_gpu
    types = dict(QW="*i32", Scales="*fp16", Zeros="*fp16", X="*bf16", Out="*bf16", M="i32", N="i32", K="i32",
                 stride="i32")
    return compile_for_gpu(gptq_decode_mma_kernel, types,
                           dict(GROUP_SIZE=128, BLOCK_N=block_n, W=w, M_TILE=m_tile, EVEN=even),
                           ("N", "K"), 90, w, 1, maxnreg)


def launch_mma(x, qweight, scales, zeros, group_size, block_n=16, w=8, m_tile=8, maxnreg=None):
    m, k = x.shape
    n = qweight.shape[1]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    gptq_decode_mma_kernel[(cdiv(n, block_n),)](
        qweight, scales, zeros, x, out, m, n, k, cdiv(cdiv(k, 128), w),
        **_constexprs(k, n, block_n, w, m_tile, group_size), num_warps=w,
        **({} if maxnreg is None else {"maxnreg": maxnreg}))
    return out
