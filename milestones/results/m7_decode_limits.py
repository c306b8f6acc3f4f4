"""#15: what limits the W4A16 decode kernel? Three probes on Qwen3-8B's projections, beside bf16 cuBLAS in one run.

1. Fewer instructions. A variant of the pairs kernel whose code pairs are adjacent along K (weights repacked so that
   fields ``j`` and ``j + 4`` of word ``t`` are rows ``32 j + 2 t`` and ``32 j + 2 t + 1``): each pair register is a
   tensor-core operand as it stands, with no byte shuffle (``prmt``), and the zero point comes off with one sum of X
   per block (``zp=1``) or a second product (``zp=2``). Compiled for sm_90 on a CPU its K loop holds 499 PTX
   instructions against the pairs kernel's 611 (``--count``).
2. The same loop without the integer work (``zp=3``: the words go to the tensor cores as they are; wrong values,
   the time of the loads, the products and their waits alone), and the word-streaming twin (loads only).
3. Occupancy. ptxas gives the pairs kernel 117 registers (four 128-thread programs per SM); ``maxnreg`` 96 fits five
   without spills, 80 six (60 bytes spilled).

The variant is an experiment, not the engine's kernel: it lives here. Run from the repository root:
    TRITON_INTERPRET=1 PYTHONPATH=src python3 milestones/results/m7_decode_limits.py --check  # CPU, interpreted
    PYTHONPATH=src python3 milestones/results/m7_decode_limits.py --count           # CPU, PTX for sm_90
    PYTHONPATH=src python3 milestones/results/m7_decode_limits.py OUT.json          # H200, about 4 minutes
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from folovllm.model_executor.layers.ops.split_k import store_tile
from folovllm.model_executor.layers.quantization.ops import gptq_gemm as ops
from folovllm.model_executor.layers.quantization.ops.triton_gptq import _group_scale_zero, _x_slice

ZP_MODES = {1: "sum of X", 2: "second product", 3: "no integer work (wrong values)"}


@triton.jit
def _adjacent_pairs_kernel(
    X,
    QWeight,
    Scales,
    Zeros,
    Perm,
    Bias,
    Out,
    Partials,
    Counters,
    M,
    N,
    K,
    stride_xm,
    blocks_per_split,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    SLICES_PER_GROUP: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    ZP: tl.constexpr,
):
    """4-bit, one group per block of 128 rows. Each pair ``(lo, hi)`` of a word is joined into consecutive K columns
    of one ``[BLOCK_N, 32]`` operand: the layout the tensor cores take from registers."""
    PACK: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = PACK // 2
    ROWS: tl.constexpr = 16
    BLOCK_K: tl.constexpr = ROWS * PACK
    MASK: tl.constexpr = ((1 << BITS) - 1) * 0x10001
    split = tl.program_id(2)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    t = tl.arange(0, ROWS)
    c = tl.arange(0, 2 * ROWS)
    x_rows = X + rm.to(tl.int64)[:, None] * stride_xm
    last_group = (K - 1) // GROUP_SIZE
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    first = split * blocks_per_split
    s_next, z_next = _group_scale_zero(Scales, Zeros, first * BLOCK_K, last_group, N, rn, n_ok, GROUP_SIZE)
    for blk in range(first, tl.minimum(first + blocks_per_split, tl.cdiv(K, BLOCK_K))):
        words = tl.load(QWeight + (blk * ROWS + t)[None, :] * N + rn[:, None], mask=n_ok[:, None], other=0)
        base = blk * BLOCK_K
        s, z = s_next, z_next
        s_next, z_next = _group_scale_zero(Scales, Zeros, base + BLOCK_K, last_group, N, rn, n_ok, GROUP_SIZE)
        part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        neg_off = tl.broadcast_to((-128 - z).to(tl.bfloat16)[:, None], (BLOCK_N, 2 * ROWS))
        for j in tl.static_range(HALF):
            pair = words if ZP == 3 else ((words >> (j * BITS)) & MASK) | 0x43004300
            lo = pair.to(tl.int16).to(tl.bfloat16, bitcast=True)
            hi = (pair >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
            a = tl.join(lo, hi).reshape(BLOCK_N, 2 * ROWS)
            xs = _x_slice(x_rows, Perm, base + j * 2 * ROWS + c, K, m_ok, HAS_PERM)
            part = tl.dot(a, tl.trans(xs), part)
            if ZP == 1:
                x_sum += tl.sum(xs.to(tl.float32), axis=1)
            if ZP == 2:
                part = tl.dot(neg_off, tl.trans(xs), part)
        if ZP == 1:
            part -= (128 + z)[:, None] * x_sum[None, :]
        acc += part * s[:, None]
    store_tile(tl.trans(acc), Out, Bias, Partials, Counters, rm, rn, m_ok, n_ok, M, N, split, HAS_BIAS, SPLIT_K)


def pack_adjacent(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``[K, N]`` (K a multiple of 128) -> int32 ``[K / 8, N]``: field ``j + 4 e`` of word row ``16 b + t``
    holds row ``128 b + 32 j + 2 t + e``."""
    k, n = codes.shape
    rows = codes.to(torch.int64).view(k // 128, 4, 16, 2, n)  # [block, j, t, e, n]
    words = torch.zeros(k // 128, 16, n, dtype=torch.int64, device=codes.device)
    for j, e in itertools.product(range(4), range(2)):
        words |= rows[:, j, :, e, :] << (4 * (j + 4 * e))
    words = words.reshape(-1, n)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def launch_adjacent(x, qweight, scales, zeros, plan: ops.GemmPlan, zp: int) -> torch.Tensor:
    return ops.launch_plan(_adjacent_pairs_kernel, {"ZP": zp}, x, qweight, scales, zeros, None, None, 4, 128, plan)


def launch_adjacent_on(x, layer: dict[str, torch.Tensor], plan: ops.GemmPlan, zp: int) -> torch.Tensor:
    return launch_adjacent(x, layer["adjacent"], layer["scales"], layer["zeros"], plan, zp)


def random_layer(k: int, n: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), device=device, generator=gen)
    return {
        "codes": codes,
        "pairs": ops.pack_for_kernel(codes, 4),
        "adjacent": pack_adjacent(codes),
        "scales": (torch.rand(k // 128, n, device=device, generator=gen) * 0.01 + 0.001).half(),
        "zeros": torch.randint(0, 16, (k // 128, n), device=device, generator=gen).half(),
    }


def weight_copies(k: int, n: int, device: torch.device) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]:
    """Random 4-bit layers and bf16 weights of one shape, as many copies of each as add up to more than the L2 holds
    (``graph_time_s`` replays over them, so each call reads HBM as a model's next layer would)."""
    from folovllm.benchmarks.hardware import copies_beyond_l2

    layer_bytes = k * n // 2 + 4 * (k // 128) * n
    layers = [random_layer(k, n, device, seed) for seed in range(copies_beyond_l2(layer_bytes, device))]
    copies = copies_beyond_l2(2 * k * n, device)
    return layers, [torch.randn(n, k, dtype=torch.bfloat16, device=device) * 0.02 for _ in range(copies)]


def reference(x: torch.Tensor, layer: dict[str, torch.Tensor]) -> torch.Tensor:
    scale, zero = (layer[name].float().repeat_interleave(128, 0) for name in ("scales", "zeros"))
    return x.float() @ ((layer["codes"] - zero) * scale)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).abs().max() / ref.abs().max()).item()


def sweep_variants(
    out: str,
    benchmark: str,
    key: str,
    ms: tuple[int, ...],
    configs: Callable[[ops.GemmPlan, int], list[dict]],
    variant: Callable[[torch.Tensor, dict, ops.GemmPlan, dict], torch.Tensor],
) -> None:
    """An experiment against the engine on Qwen3-8B's projections (the probes ``m7_mma_decode.py``, ``m7_streamk.py``
    and ``m7_pingpong.py``): per projection and row count in ``ms``, bf16 and the tuned plan, then
    ``variant(x, layer, tuned, cfg)`` for each ``cfg`` of ``configs(tuned, m)``, checked against the reference and
    timed over the weight copies. A configuration that does not compile or launch is reported, not fatal. Each row
    lists its configurations under ``key``; ``out`` is saved after every row."""
    from folovllm.benchmarks.common import provenance, save_json
    from folovllm.benchmarks.gptq import QWEN3_8B_SHAPES
    from folovllm.benchmarks.hardware import graph_time_s

    dev = torch.device("cuda")
    rows = []
    for name, (k, n) in QWEN3_8B_SHAPES.items():
        layers, dense = weight_copies(k, n, dev)
        for m in ms:
            x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
            ref = reference(x, layers[0])
            tuned = ops.plan_gptq_gemm(m, n, k, 4, dev, 2)
            t = lambda fns: graph_time_s(fns, dev) * 1e6  # noqa: E731
            row = {"layer": name, "m": m, "k": k, "n": n, "tuned_plan": dataclasses.asdict(tuned),
                   "bf16_us": t([partial(F.linear, x, w) for w in dense]),
                   "tuned_us": t([partial(ops.launch_gptq_gemm, x, L["pairs"], L["scales"], L["zeros"], None, None, 4,
                                          128, tuned) for L in layers]), key: []}  # fmt: skip
            for cfg in configs(tuned, m):
                try:
                    err = rel_err(variant(x, layers[0], tuned, cfg), ref)
                    us = t([partial(variant, x, L, tuned, cfg) for L in layers])
                except Exception as e:
                    row[key].append(cfg | {"error": str(e)[:200]})
                    continue
                row[key].append(cfg | {"us": us, "err": err})
            best = min((r for r in row[key] if "us" in r and r["err"] < 0.02), key=lambda r: r["us"], default=None)
            print(f"{name} m={m}: bf16 {row['bf16_us']:.2f} tuned {row['tuned_us']:.2f} best {key} {best}", flush=True)
            rows.append(row)
            save_json(out, provenance(dev, "random 4-bit layers, Qwen3-8B shapes", torch.bfloat16)
                      | {"benchmark": benchmark, "rows": rows})  # fmt: skip


def check() -> None:
    """The variant equals the reference (zp 1 and 2) on the CPU, under Triton's interpreter."""
    layer = random_layer(512, 256, torch.device("cpu"), 0)
    for m, zp, split in itertools.product((1, 3), (1, 2), (1, 2)):
        x = torch.randn(m, 512, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(m))
        plan = ops.GemmPlan(16, 128, False, split, 4 // split, 4, 3, swap_ab=True, pairs=True)
        got = launch_adjacent(x, layer["adjacent"], layer["scales"], layer["zeros"], plan, zp)
        err = rel_err(got, reference(x, layer))
        print(f"m={m} zp={zp} split={split}: max error / max |ref| = {err:.4f}")
        assert err < 0.01, err


def count() -> None:
    """K-loop PTX instructions for sm_90, the pairs kernel and the variant, at the plan gate_up runs at M = 1."""
    from folovllm.triton_utils.offline_compile import compile_for_gpu, loop_instructions

    plan = ops.GemmPlan(16, 128, False, 4, 8, 4, 4, swap_ab=True, pairs=True)
    print("pairs kernel:", len(loop_instructions(ops.compile_plan(plan)["ptx"])))
    for zp, what in ZP_MODES.items():
        asm = compile_for_gpu(
            _adjacent_pairs_kernel,
            ops.kernel_arg_types(),
            ops._constexprs(plan, 4, 128, False, False) | {"ZP": zp},
            ("N", "K", "stride_xm"),
            90,
            4,
            4,
        )
        print(f"adjacent pairs, zp={zp} ({what}):", len(loop_instructions(asm["ptx"])))


def measure(out: str) -> None:
    from folovllm.benchmarks.common import provenance, save_json
    from folovllm.benchmarks.gptq import QWEN3_8B_SHAPES
    from folovllm.benchmarks.hardware import graph_time_s
    from folovllm.benchmarks.word_stream import stream_words

    dev = torch.device("cuda")
    rows = []
    for name, (k, n) in QWEN3_8B_SHAPES.items():
        layers, dense = weight_copies(k, n, dev)
        for m in (1, 4, 16):
            x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
            ref = reference(x, layers[0])
            tuned = ops.plan_gptq_gemm(m, n, k, 4, dev, 2)

            def run_pairs(layer, plan, maxnreg=None):
                if maxnreg is None:
                    return ops.launch_gptq_gemm(
                        x, layer["pairs"], layer["scales"], layer["zeros"], None, None, 4, 128, plan=plan
                    )
                kernel, extra = ops._kernel_for(plan, x.dtype, 4)
                args = (x, layer["pairs"], layer["scales"], layer["zeros"], None, None, 4, 128, plan)
                return ops.launch_plan(kernel, extra | {"maxnreg": maxnreg}, *args)  # a launch option

            def timed(fn) -> dict:
                return {
                    "us": graph_time_s([partial(fn, layer) for layer in layers], dev) * 1e6,
                    "err": rel_err(fn(layers[0]), ref),
                }

            row = {
                "layer": name,
                "m": m,
                "k": k,
                "n": n,
                "tuned_plan": dataclasses.asdict(tuned),
                "bf16_us": graph_time_s([partial(F.linear, x, w) for w in dense], dev) * 1e6,
                "pairs": timed(partial(run_pairs, plan=tuned)),
                "adjacent": [],
                "maxnreg": [],
            }
            if not tuned.gemv:
                row["words_only_us"] = graph_time_s([partial(stream_words, L["pairs"], tuned) for L in layers], dev) * 1e6
            blocks = ops.cdiv(k, 128)
            for split, zp, stages in itertools.product((2, 4, 8, 16), ZP_MODES, (3, 4)):
                if ops.cdiv(blocks, split) < 3:
                    continue
                plan = ops.GemmPlan(16, 128, False, split, ops.cdiv(blocks, split), 4, stages, swap_ab=True, pairs=True)
                fn = partial(launch_adjacent_on, x, plan=plan, zp=zp)
                row["adjacent"].append({"split_k": split, "num_stages": stages, "zp": zp} | timed(fn))
            for split, maxnreg in itertools.product({tuned.split_k, max(tuned.split_k // 2, 2)}, (96, 80)):
                plan = dataclasses.replace(tuned, split_k=split, blocks_per_split=ops.cdiv(blocks, split))
                row["maxnreg"].append(
                    {"split_k": split, "maxnreg": maxnreg} | timed(partial(run_pairs, plan=plan, maxnreg=maxnreg))
                )
            best = {
                zp: min(a["us"] for a in row["adjacent"] if a["zp"] == zp and (zp == 3 or a["err"] < 0.02))
                for zp in ZP_MODES
            }
            best_reg = min(v["us"] for v in row["maxnreg"] if v["err"] < 0.02)
            row["best_adjacent_us"], row["best_maxnreg_us"] = {str(z): v for z, v in best.items()}, best_reg
            print(
                f"{name} m={m}: bf16 {row['bf16_us']:.1f} us, pairs {row['pairs']['us']:.1f}, adjacent "
                f"zp1 {best[1]:.1f} zp2 {best[2]:.1f} no-int {best[3]:.1f}, maxnreg {best_reg:.1f}, words only "
                f"{row.get('words_only_us', float('nan')):.1f}",
                flush=True,
            )
            rows.append(row)
    save_json(
        out,
        provenance(dev, "random 4-bit layers, Qwen3-8B shapes", torch.bfloat16)
        | {"benchmark": "m7_decode_limits", "zp_modes": ZP_MODES, "rows": rows},
    )


if __name__ == "__main__":
    {"--check": lambda: check(), "--count": lambda: count()}.get(sys.argv[1], lambda: measure(sys.argv[1]))()
