"""#15, twenty-third session: a different decode structure, timed beside the engine's tuned Gluon plans and bf16.

The kernel here is an experiment, not the engine's: ``mma.sync`` products with the codes as the first operand; the
program's warps split K among themselves (their sums meet in the program, not through global memory); words, zero
points, scales and X come straight from global memory one or two blocks ahead of the products (no shared-memory ring,
no barriers, no warp specialization, no split-K reduction). Each configuration (columns per program, warps, register
cap, blocks ahead, X ahead or not) is checked against the reference.

    PYTHONPATH=src python3 milestones/results/m7_mma_decode.py OUT.json            # H200, first sweep
    PYTHONPATH=src python3 milestones/results/m7_mma_decode.py --sweep2 OUT.json   # loads 1 or 2 blocks ahead
"""

from __future__ import annotations

import itertools
import os
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from m7_decode_limits import sweep_variants  # noqa: E402

from folovllm.model_executor.layers.quantization.ops import gptq_gemm as ops  # noqa: E402
from folovllm.model_executor.layers.quantization.ops.gluon_gptq import _CONSTRAINTS, PER_ASM, _byte_perm_asm  # noqa: E402
from folovllm.model_executor.layers.quantization.ops.triton_gptq import PER_CHANNEL  # noqa: E402
from folovllm.utils import cdiv  # noqa: E402


@gluon.jit
def _block(QW, Scales, Zeros, X, i, stride, n0, M, N, K, total, last_group, GROUP_SIZE: gl.constexpr,
           BLOCK_N: gl.constexpr, W: gl.constexpr, M_TILE: gl.constexpr, X_AHEAD: gl.constexpr,
           mma: gl.constexpr):  # fmt: skip
    """Block ``i`` of every warp's K range: its words, zero points, scales and (``X_AHEAD``) its 8 slices of X."""
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    z_l: gl.constexpr = gl.SliceLayout(2, a_l)
    s_l: gl.constexpr = gl.SliceLayout(2, mma)
    aw = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, a_l)))[:, None, None]
    an = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, gl.SliceLayout(2, a_l)))[None, :, None]
    at = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, a_l)))[None, None, :]
    b = aw * stride + i
    words = gl.load(QW + (b * 16 + at) * N + an, mask=(b < total) & (i < stride) & (an < N), other=0)
    zw = gl.arange(0, W, layout=gl.SliceLayout(1, z_l))[:, None]
    zn = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, z_l))[None, :]
    z = gl.load(Zeros + gl.minimum((zw * stride + i) * 128 // GROUP_SIZE, last_group) * N + zn, mask=zn < N, other=0.0)
    sw = gl.arange(0, W, layout=gl.SliceLayout(1, s_l))[:, None]
    sn = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_l))[None, :]
    sc = gl.load(Scales + gl.minimum((sw * stride + i) * 128 // GROUP_SIZE, last_group) * N + sn, mask=sn < N,
                 other=0.0)  # fmt: skip
    xs = ()
    if X_AHEAD:
        xs = _x_slices(X, i, stride, M, K, total, W, M_TILE, mma)
    return words, z, sc, xs


@gluon.jit
def _x_slices(X, i, stride, M, K, total, W: gl.constexpr, M_TILE: gl.constexpr, mma: gl.constexpr):
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    bw = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, b_l)))[:, None, None]
    bt = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, b_l)))[None, :, None]
    bm = gl.arange(0, M_TILE, layout=gl.SliceLayout(0, gl.SliceLayout(1, b_l)))[None, None, :]
    b = bw * stride + i
    ok = (bm < M) & (b < total) & (i < stride)
    xs = ()
    for j in gl.static_range(8):
        xs = xs + (gl.load(X + bm * K + b * 128 + j * 16 + bt, mask=ok, other=0.0),)
    return xs


@gluon.jit
def _products(acc, blk, X, i, stride, M, K, total, BLOCK_N: gl.constexpr, W: gl.constexpr, M_TILE: gl.constexpr,
              X_AHEAD: gl.constexpr, mma: gl.constexpr):  # fmt: skip
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    words, z, sc, xs = blk
    if not X_AHEAD:
        xs = _x_slices(X, i, stride, M, K, total, W, M_TILE, mma)
    offs = (128.0 + z.to(gl.float32)).to(gl.bfloat16)[:, :, None] + gl.zeros([W, BLOCK_N, 16], gl.bfloat16, a_l)
    part = gl.zeros([W, BLOCK_N, M_TILE], gl.float32, mma)
    for q in gl.static_range(8 // PER_ASM):
        codes = gl.inline_asm_elementwise(_byte_perm_asm(4, q), _CONSTRAINTS, [words, offs],
                                          dtype=(gl.bfloat16,) * PER_ASM, is_pure=True, pack=2)  # fmt: skip
        for c in gl.static_range(PER_ASM):
            part = mma_v2(codes[c], xs[q * PER_ASM + c], part)
    return acc + part * sc.to(gl.float32)[:, :, None]


@gluon.jit
def gptq_decode_mma_kernel(QW, Scales, Zeros, X, Out, M, N, K, stride,
                           GROUP_SIZE: gl.constexpr, BLOCK_N: gl.constexpr, W: gl.constexpr,
                           M_TILE: gl.constexpr, DEPTH: gl.constexpr, X_AHEAD: gl.constexpr):  # fmt: skip
    """``Out = X @ W`` for ``M <= M_TILE``: program ``n`` owns ``BLOCK_N`` columns, its warp ``w`` blocks
    ``[w * stride, (w + 1) * stride)``; each warp's loads run ``DEPTH`` blocks ahead of its products."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1, 1], instr_shape=[1, 16, 8])
    n0 = gl.program_id(0) * BLOCK_N
    total = gl.cdiv(K, 128)
    last_group = (K - 1) // GROUP_SIZE
    acc = gl.zeros([W, BLOCK_N, M_TILE], gl.float32, mma)
    args = (QW, Scales, Zeros, X)
    b0 = _block(*args, 0, stride, n0, M, N, K, total, last_group, GROUP_SIZE, BLOCK_N, W, M_TILE, X_AHEAD, mma)
    if DEPTH == 1:
        for i in range(stride):
            cur = b0
            b0 = _block(*args, i + 1, stride, n0, M, N, K, total, last_group, GROUP_SIZE, BLOCK_N, W, M_TILE,
                        X_AHEAD, mma)  # fmt: skip
            acc = _products(acc, cur, X, i, stride, M, K, total, BLOCK_N, W, M_TILE, X_AHEAD, mma)
    else:
        b1 = _block(*args, 1, stride, n0, M, N, K, total, last_group, GROUP_SIZE, BLOCK_N, W, M_TILE, X_AHEAD, mma)
        for i in range(stride):
            cur = b0
            b0 = b1
            b1 = _block(*args, i + 2, stride, n0, M, N, K, total, last_group, GROUP_SIZE, BLOCK_N, W, M_TILE,
                        X_AHEAD, mma)  # fmt: skip
            acc = _products(acc, cur, X, i, stride, M, K, total, BLOCK_N, W, M_TILE, X_AHEAD, mma)
    out = gl.sum(acc, axis=0)
    o_l: gl.constexpr = gl.SliceLayout(0, mma)
    rn = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, o_l))[:, None]
    rm = gl.arange(0, M_TILE, layout=gl.SliceLayout(0, o_l))[None, :]
    gl.store(Out + rm * N + rn, out.to(gl.bfloat16), mask=(rn < N) & (rm < M))


def compile_mma(block_n=16, w=8, m_tile=8, maxnreg=None, depth=1, x_ahead=True):
    from folovllm.triton_utils.offline_compile import compile_for_gpu

    types = dict(QW="*i32", Scales="*fp16", Zeros="*fp16", X="*bf16", Out="*bf16", M="i32", N="i32", K="i32", stride="i32")
    return compile_for_gpu(
        gptq_decode_mma_kernel,
        types,
        dict(GROUP_SIZE=128, BLOCK_N=block_n, W=w, M_TILE=m_tile, DEPTH=depth, X_AHEAD=x_ahead),
        ("N", "K"),
        90,
        w,
        1,
        maxnreg,
    )


def launch_mma(x, qweight, scales, zeros, group_size, block_n=16, w=8, m_tile=8, maxnreg=None, depth=1, x_ahead=True):
    m, k = x.shape
    n = qweight.shape[1]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    gptq_decode_mma_kernel[(cdiv(n, block_n),)](
        qweight,
        scales,
        zeros,
        x,
        out,
        m,
        n,
        k,
        cdiv(cdiv(k, 128), w),
        GROUP_SIZE=PER_CHANNEL if group_size == -1 else group_size,
        BLOCK_N=block_n,
        W=w,
        M_TILE=m_tile,
        DEPTH=depth,
        X_AHEAD=x_ahead,
        num_warps=w,
        **({} if maxnreg is None else {"maxnreg": maxnreg}),
    )
    return out


# (columns per program, warps, register cap, blocks loaded ahead, X loaded ahead too)
SWEEPS = {
    "first": (
        [(bn, w, reg, 1, True) for bn, w in itertools.product((16, 32), (4, 8, 16)) for reg in (None, 96)],
        (1, 4, 16),
    ),
    "second": (
        [
            (bn, w, None, depth, ahead)
            for bn, w in ((16, 4), (16, 8), (32, 4), (32, 8))
            for depth, ahead in itertools.product((1, 2), (True, False))
        ],
        (1, 4),
    ),
}


def _variant(x: torch.Tensor, layer: dict, tuned: ops.GemmPlan, cfg: dict) -> torch.Tensor:
    return launch_mma(x, layer["pairs"], layer["scales"], layer["zeros"], 128, block_n=cfg["block_n"], w=cfg["warps"],
                      m_tile=8 if x.shape[0] <= 8 else 16, maxnreg=cfg["maxnreg"], depth=cfg["depth"],
                      x_ahead=cfg["x_ahead"])  # fmt: skip


def main(out: str, sweep: str) -> None:
    configs, ms = SWEEPS[sweep]
    cfgs = [{"block_n": bn, "warps": w, "maxnreg": reg, "depth": depth, "x_ahead": ahead}
            for bn, w, reg, depth, ahead in configs]  # fmt: skip
    sweep_variants(out, f"m7_mma_decode ({sweep} sweep)", "mma", ms, lambda tuned, m: cfgs, _variant)


if __name__ == "__main__":
    if sys.argv[1] == "--sweep2":
        main(sys.argv[2], "second")
    else:
        main(sys.argv[1], "first")
