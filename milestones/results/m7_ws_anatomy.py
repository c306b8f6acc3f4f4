"""#15: where the Gluon decode kernel's time goes, and its ring depth. In one run on Qwen3-8B's projections at M = 1,
4, 16 and 64, each tuned plan (``ops/gluon_gptq.py``) is timed beside:

- itself with 1, 2, 3 and 4 ring stages (the tuned plans had 4; the twenty-second session's first runs, stages
  ``release`` and ``release2``, found 2 faster);
- *splits apart*: the same launch compiled with ``SPLIT_K=1`` on the same grid, so each K split stores its own partial
  sum into the output (the split-K reduction's store, atomic and reads are gone; the result is wrong, not checked);
- *products alone* (M = 1): the compute warps fed by a loader that copies nothing (``_idle_load_partition`` only
  marks each stage ready), so they convert and multiply whatever shared memory holds: the kernel without its loads.
  Since the twenty-third session the zero points and scales come through the ring too, so this twin loads nothing;
  before, its compute warps still loaded them from global memory (stage ``scales`` at 01a5a91 timed both).

``--pick`` then writes into the tuned table, for each (projection, M), the ring depth that beat the tuned plan's by
2% or more in that run.

``--codes no-sub`` bounds what folding the zero point out of the compute loop could save: it times each tuned plan and
its products-alone twin at M = 1 and 16 with ``_byte_perm_asm``'s ``sub.bf16x2`` replaced by a move (the codes stay
bf16 ``128 + q``; wrong values, timing only), ``--codes plain`` the same unchanged. A fold would still need the sums
of X per block, so it would save less than this. Run each in its own process with its own ``TRITON_CACHE_DIR``.

Run from the repository root:
    PYTHONPATH=src python3 milestones/results/m7_ws_anatomy.py OUT.json          # H200
    PYTHONPATH=src python3 milestones/results/m7_ws_anatomy.py --pick OUT.json   # then: the tuned table
    PYTHONPATH=src TRITON_CACHE_DIR=$(mktemp -d) python3 milestones/results/m7_ws_anatomy.py --codes no-sub OUT.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from functools import partial

import torch
import torch.nn.functional as F
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from m7_decode_limits import reference, rel_err, weight_copies  # noqa: E402

from folovllm.model_executor.layers.quantization.ops import gluon_gptq as ws  # noqa: E402
from folovllm.model_executor.layers.quantization.ops import gptq_gemm as ops  # noqa: E402

DEPTHS = (1, 2, 3, 4)


@gluon.jit
def _idle_load_partition(ready, empty, count, STAGES: gl.constexpr):
    """A loader that copies nothing: it waits for each stage to be free and marks it ready at once."""
    for i in range(count):
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
        mbarrier.arrive(ready.index(s), count=1)


@gluon.jit
def _products_kernel(w_desc, x_desc, z_desc, Out, N, K, blocks_per_split, BLOCK_N: gl.constexpr,
                     STAGES: gl.constexpr, WARPS: gl.constexpr):  # fmt: skip
    """The decode kernel's compute warps fed by ``_idle_load_partition``; each split stores its partial sum."""
    PACK: gl.constexpr = 8
    M_TILE: gl.constexpr = x_desc.block_type.shape[0]
    total = gl.cdiv(K, 16 * PACK)
    first = gl.program_id(1) * blocks_per_split
    count = gl.maximum(gl.minimum(first + blocks_per_split, total) - first, 0)
    off_n = gl.program_id(0) * BLOCK_N
    w_bufs, x_bufs, z_bufs, s_bufs, ready, empty = ws.ring(w_desc, x_desc, z_desc, STAGES, PACK)
    # fmt: off
    results = gl.warp_specialize([
        (ws._compute_partition, (ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, count, 4, BLOCK_N, STAGES, False,
                                 M_TILE, WARPS, True)),
        (_idle_load_partition, (ready, empty, count, STAGES)),
    ], [1], [24])
    # fmt: on
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, M_TILE, 16])
    rn = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    rm = gl.arange(0, M_TILE, layout=gl.SliceLayout(0, mma))
    gl.store(Out + rm[None, :] * N + rn[:, None], results[0].to(gl.bfloat16), mask=(rn < N)[:, None] & (rm < 1)[None, :])


def _no_sub(text: str) -> str:
    return "\n".join(f"mov.b32 {ln.split()[1]} u;" if ln.startswith("sub.bf16x2") else ln for ln in text.splitlines())


# 4-bit codes: ``_byte_perm_asm``'s two blocks per word pair, each ``sub.bf16x2`` a move (made here, outside the
# JIT: a constexpr function may not call a plain one)
_NO_SUB_4BIT = tuple(_no_sub(ws._byte_perm_asm.fn(4, q)) for q in range(8 // ws._PER_ASM))


@gluon.constexpr_function
def _byte_perm_no_sub(bits: int, q: int) -> str:
    """``_byte_perm_asm`` with each ``sub.bf16x2`` a move: the products see ``128 + q`` (4-bit; timing only)."""
    return _NO_SUB_4BIT[q]


def kernel(x: torch.Tensor, layer: dict, plan: ws.WsPlan) -> torch.Tensor:
    """The production kernel on one layer (``launch_gptq_decode_ws``), 4-bit codes in groups of 128."""
    return ws.launch_gptq_decode_ws(x, layer["pairs"], layer["scales"], layer["zeros"], None, 4, 128, plan)


def products(x: torch.Tensor, layer: dict, plan: ws.WsPlan) -> torch.Tensor:
    k, n = x.shape[1], layer["pairs"].shape[1]
    out = torch.empty(1, n, dtype=torch.bfloat16, device=x.device)
    w_desc, x_desc, z_desc, _ = ws.descriptors(x, layer["pairs"], layer["scales"], layer["zeros"], plan)
    _products_kernel[(ops.cdiv(n, plan.block_n), plan.split_k)](
        w_desc, x_desc, z_desc, out, n, k, ops.cdiv(ops.cdiv(k, 128), plan.split_k),
        BLOCK_N=plan.block_n, STAGES=plan.stages, WARPS=plan.num_warps, num_warps=plan.num_warps, maxnreg=plan.maxnreg,
    )  # fmt: skip
    return out


def splits_apart(x: torch.Tensor, layer: dict, plan: ws.WsPlan) -> torch.Tensor:
    """The production kernel compiled with ``SPLIT_K=1`` on a grid of ``plan.split_k`` splits: no reduction."""
    m, k = x.shape
    n = layer["pairs"].shape[1]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    descs = ws.descriptors(x, layer["pairs"], layer["scales"], layer["zeros"], plan)
    constexprs = ws._constexprs(plan, 4, 128, False) | {"SPLIT_K": 1}
    ws.gptq_decode_ws_kernel[(ops.cdiv(n, plan.block_n), plan.split_k)](
        *descs, out, out, out, out, m, n, k,
        ops.cdiv(ops.cdiv(k, 128), plan.split_k), **constexprs, num_warps=plan.num_warps, maxnreg=plan.maxnreg,
    )  # fmt: skip
    return out


def measure(out: str) -> None:
    from folovllm.benchmarks.common import provenance, save_json
    from folovllm.benchmarks.gptq import QWEN3_8B_SHAPES
    from folovllm.benchmarks.hardware import graph_time_s

    dev = torch.device("cuda")
    rows = []
    for name, (k, n) in QWEN3_8B_SHAPES.items():
        layers, dense = weight_copies(k, n, dev)
        for m in (1, 4, 16, 64):
            x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
            ref = reference(x, layers[0])
            tuned = ops.plan_gptq_gemm(m, n, k, 4, dev, 2)
            base = ops.as_ws_plan(tuned, m)

            def timed(fn, check: bool = True) -> dict:
                err = rel_err(fn(layers[0]), ref) if check else None
                return {"us": graph_time_s([partial(fn, layer) for layer in layers], dev) * 1e6, "err": err}

            row = {"layer": name, "m": m, "k": k, "n": n, "tuned_plan": dataclasses.asdict(tuned),
                   "bf16_us": graph_time_s([partial(F.linear, x, w) for w in dense], dev) * 1e6,
                   "depths": {d: timed(partial(kernel, x, plan=dataclasses.replace(base, stages=d)))
                              for d in DEPTHS}}  # fmt: skip
            if base.split_k > 1:
                row["splits_apart"] = {d: timed(partial(splits_apart, x, plan=dataclasses.replace(base, stages=d)),
                                                check=False)["us"] for d in (2, base.stages)}  # fmt: skip
            if m == 1:
                row["products_alone"] = {d: timed(partial(products, x, plan=dataclasses.replace(base, stages=d)),
                                                  check=False)["us"] for d in (2, base.stages)}  # fmt: skip
            depths = {d: f"{r['us']:.2f}" for d, r in row["depths"].items()}
            print(f"{name} m={m}: bf16 {row['bf16_us']:.1f} us, depths {depths}, splits apart "
                  f"{row.get('splits_apart')}, products alone {row.get('products_alone')}", flush=True)  # fmt: skip
            rows.append(row)
            save_json(out, provenance(dev, "random 4-bit layers, Qwen3-8B shapes", torch.bfloat16)
                      | {"benchmark": "m7_ws_anatomy", "rows": rows})  # fmt: skip


def pick(path: str) -> None:
    """Each tuned ``ws`` plan with the ring depth that was fastest in ``path``'s run, where it beat the tuned depth by
    2% or more and every depth's result was within the reference's tolerance."""
    result = json.loads(open(path).read())
    plans = {}
    for row in result["rows"]:
        tuned = ops.GemmPlan(**row["tuned_plan"])
        depths = {int(d): r for d, r in row["depths"].items()}
        if not tuned.ws or any(r["err"] >= 0.02 for r in depths.values()):
            continue
        best = min(depths, key=lambda d: depths[d]["us"])
        if depths[best]["us"] <= 0.98 * depths[tuned.num_stages]["us"]:
            plans[ops.tuned_key(4, row["m"], row["k"], row["n"])] = dataclasses.asdict(
                dataclasses.replace(tuned, num_stages=best)
            )
            print(f"{row['layer']} m={row['m']}: {tuned.num_stages} -> {best} stages, "
                  f"{depths[tuned.num_stages]['us']:.2f} -> {depths[best]['us']:.2f} us")  # fmt: skip
    source = {key: result[key] for key in ("commit", "date", "gpu")} | {"from": os.path.basename(path)}
    print(ops.write_tuned_plans(result["gpu"], plans, source, merge=True))


def codes(variant: str, out: str) -> None:
    """The tuned plan and its products-alone twin at M = 1 and 16, with the codes made as ``variant`` says."""
    from folovllm.benchmarks.common import provenance, save_json
    from folovllm.benchmarks.gptq import QWEN3_8B_SHAPES
    from folovllm.benchmarks.hardware import graph_time_s

    if variant == "no-sub":
        ws._byte_perm_asm = _byte_perm_no_sub  # the compute partition reads this global when it is compiled
    dev = torch.device("cuda")
    rows = []
    for name, (k, n) in QWEN3_8B_SHAPES.items():
        layers, _ = weight_copies(k, n, dev)
        for m in (1, 16):
            x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
            plan = ops.as_ws_plan(ops.plan_gptq_gemm(m, n, k, 4, dev, 2), m)

            row = {"layer": name, "m": m, "plan": dataclasses.asdict(plan),
                   "kernel_us": graph_time_s([partial(kernel, x, L, plan) for L in layers], dev) * 1e6}  # fmt: skip
            if m == 1:
                row["products_alone_us"] = graph_time_s([partial(products, x, L, plan) for L in layers], dev) * 1e6
            print(variant, row, flush=True)
            rows.append(row)
    save_json(out, provenance(dev, "random 4-bit layers, Qwen3-8B shapes", torch.bfloat16)
              | {"benchmark": f"m7_ws_anatomy --codes {variant}", "rows": rows})  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1] == "--pick":
        pick(sys.argv[2])
    elif sys.argv[1] == "--codes":
        codes(sys.argv[2], sys.argv[3])
    else:
        measure(sys.argv[1])
