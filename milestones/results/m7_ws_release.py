"""#15: the Gluon decode kernel with each word stage freed as soon as its words sit in registers (``early_release``)
against the same plans freeing it after the block's products, as before; in one run on Qwen3-8B's projections at
M = 1 and 16, every variant checked against the reference.

Why: a stage used to stay taken while the compute warps converted its codes and multiplied, so the ring's bytes in
flight were the ring minus the blocks being worked on; with the words copied to registers first, the loader refills
the stage during that work. X's slices are still read by the products, so X got a ring of its own, twice as deep.

Beside each tuned plan, two twins say where the rest of the time goes: the same launch with its K splits not meeting
(every split stores its own partial sum into the output: the reduction's store, atomic and reads are gone; the
result is wrong and not checked) and the same launch with a loader that copies nothing (``_idle_load_partition``: it
only signals each stage ready, so the compute warps work on whatever shared memory holds: the products alone). Then
a sweep of plans with early release, in the format ``m7_ws_decode.py --tune`` reads.

The first run (stage ``release``) found early release 1-4% slower at the tuned plans' four stages but faster at two;
``--stages`` (stage ``release2``) times each tuned geometry at 2, 3 and 4 word stages with and without early release
at M = 1, 4, 16 and 64, and sweeps the geometry at two stages with early release (not at 64 rows).

Run from the repository root:
    PYTHONPATH=src python3 milestones/results/m7_ws_release.py OUT.json   # H200
    PYTHONPATH=src python3 milestones/results/m7_ws_release.py --stages OUT.json   # H200
    PYTHONPATH=src python3 milestones/results/m7_ws_decode.py --tune OUT.json
"""

from __future__ import annotations

import dataclasses
import os
import sys
from functools import partial

import torch
import torch.nn.functional as F
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from m7_decode_limits import reference, rel_err, weight_copies  # noqa: E402
from m7_ws_decode import checks, plans  # noqa: E402

from folovllm.model_executor.layers.quantization.ops import gluon_gptq as ws  # noqa: E402
from folovllm.model_executor.layers.quantization.ops import gptq_gemm as ops  # noqa: E402


@gluon.jit
def _idle_load_partition(ready, w_empty, x_empty, count, STAGES: gl.constexpr, X_STAGES: gl.constexpr):
    """A loader that copies nothing: it waits for each stage to be free and marks it ready at once."""
    for i in range(count):
        s = i % STAGES
        mbarrier.wait(w_empty.index(s), ((i // STAGES) & 1) ^ 1)
        mbarrier.wait(x_empty.index(i % X_STAGES), ((i // X_STAGES) & 1) ^ 1)
        mbarrier.arrive(ready.index(s), count=1)


@gluon.jit
def _products_kernel(w_desc, x_desc, Scales, Zeros, Out, N, K, blocks_per_split, BLOCK_N: gl.constexpr,
                     STAGES: gl.constexpr, X_STAGES: gl.constexpr, WARPS: gl.constexpr, EARLY: gl.constexpr):  # fmt: skip
    """The decode kernel's compute warps fed by ``_idle_load_partition``; each split stores its partial sum."""
    PACK: gl.constexpr = 8
    M_TILE: gl.constexpr = x_desc.block_type.shape[0]
    total = gl.cdiv(K, 16 * PACK)
    first = gl.program_id(1) * blocks_per_split
    count = gl.maximum(gl.minimum(first + blocks_per_split, total) - first, 0)
    off_n = gl.program_id(0) * BLOCK_N
    w_bufs, x_bufs, ready, w_empty, x_empty = ws.ring(w_desc, x_desc, STAGES, X_STAGES, PACK)
    # fmt: off
    results = gl.warp_specialize([
        (ws._compute_partition, (ready, w_empty, x_empty, w_bufs, x_bufs, Scales, Zeros, N, first, count, off_n,
                                 (K - 1) // 128, 4, 128, BLOCK_N, STAGES, X_STAGES, False, M_TILE, WARPS, True,
                                 EARLY)),
        (_idle_load_partition, (ready, w_empty, x_empty, count, STAGES, X_STAGES)),
    ], [1], [24])
    # fmt: on
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, M_TILE, 16])
    rn = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    rm = gl.arange(0, M_TILE, layout=gl.SliceLayout(0, mma))
    gl.store(Out + rm[None, :] * N + rn[:, None], results[0].to(gl.bfloat16), mask=(rn < N)[:, None] & (rm < 1)[None, :])


def _descriptors(x: torch.Tensor, qweight: torch.Tensor, plan: ws.WsPlan):
    w_layout, x_layout = ws._descriptor_layouts(plan)
    return (TensorDescriptor.from_tensor(qweight, [16, plan.block_n], w_layout),
            TensorDescriptor.from_tensor(x, [plan.m_tile, 16], x_layout))  # fmt: skip


def products(x: torch.Tensor, layer: dict, plan: ws.WsPlan) -> torch.Tensor:
    k, n = x.shape[1], layer["pairs"].shape[1]
    out = torch.empty(1, n, dtype=torch.bfloat16, device=x.device)
    w_desc, x_desc = _descriptors(x, layer["pairs"], plan)
    grid = (ops.cdiv(n, plan.block_n), plan.split_k)
    _products_kernel[grid](w_desc, x_desc, layer["scales"], layer["zeros"], out, n, k,
                           ops.cdiv(ops.cdiv(k, 128), plan.split_k), BLOCK_N=plan.block_n, STAGES=plan.stages,
                           X_STAGES=plan.x_stages, WARPS=plan.num_warps, EARLY=plan.early_release,
                           num_warps=plan.num_warps, maxnreg=plan.maxnreg)  # fmt: skip
    return out


def splits_apart(x: torch.Tensor, layer: dict, plan: ws.WsPlan) -> torch.Tensor:
    """The production kernel compiled with ``SPLIT_K=1`` on a grid of ``plan.split_k`` splits: no reduction."""
    m, k = x.shape
    n = layer["pairs"].shape[1]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    w_desc, x_desc = _descriptors(x, layer["pairs"], plan)
    constexprs = ws._constexprs(plan, 4, 128, False) | {"SPLIT_K": 1}
    ws.gptq_decode_ws_kernel[(ops.cdiv(n, plan.block_n), plan.split_k)](
        w_desc, x_desc, layer["scales"], layer["zeros"], out, out, out, out, m, n, k,
        ops.cdiv(ops.cdiv(k, 128), plan.split_k), **constexprs, num_warps=plan.num_warps, maxnreg=plan.maxnreg,
    )  # fmt: skip
    return out


def measure(out: str) -> None:
    from folovllm.benchmarks.common import provenance, save_json
    from folovllm.benchmarks.gptq import QWEN3_8B_SHAPES
    from folovllm.benchmarks.hardware import graph_time_s

    dev = torch.device("cuda")
    check_rows = checks(dev)  # WsPlan's default is early release: these check it on the odd cases
    rows = []
    for name, (k, n) in QWEN3_8B_SHAPES.items():
        layers, dense = weight_copies(k, n, dev)
        for m in (1, 16):
            x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
            ref = reference(x, layers[0])
            tuned = ops.plan_gptq_gemm(m, n, k, 4, dev, 2)
            before = dataclasses.replace(ops.as_ws_plan(tuned, m), early_release=False)
            after = dataclasses.replace(before, early_release=True)

            def run_ws(layer, plan):
                return ws.launch_gptq_decode_ws(x, layer["pairs"], layer["scales"], layer["zeros"], None, 4, 128, plan)

            def timed(fn, check: bool = True) -> dict:
                err = rel_err(fn(layers[0]), ref) if check else None
                return {"us": graph_time_s([partial(fn, layer) for layer in layers], dev) * 1e6, "err": err}

            def attempt(plan) -> dict:
                try:
                    return dataclasses.asdict(plan) | timed(partial(run_ws, plan=plan))
                except Exception as exc:  # a plan that does not compile or launch is recorded, not fatal
                    return dataclasses.asdict(plan) | {"error": repr(exc)[:300]}

            row = {"layer": name, "m": m, "k": k, "n": n, "tuned_plan": dataclasses.asdict(tuned),
                   "bf16_us": graph_time_s([partial(F.linear, x, w) for w in dense], dev) * 1e6,
                   "tuned": timed(partial(run_ws, plan=before)), "early": timed(partial(run_ws, plan=after)),
                   "variants": [attempt(p) for p in (dataclasses.replace(after, async_mma=True),
                                                     dataclasses.replace(after, stages=6),
                                                     dataclasses.replace(after, stages=2))]}  # fmt: skip
            if before.split_k > 1:
                row["splits_apart"] = {e: timed(partial(splits_apart, x, plan=dataclasses.replace(before, early_release=e)),
                                                check=False)["us"] for e in (False, True)}  # fmt: skip
            if m == 1:
                row["products_alone"] = {e: timed(partial(products, x, plan=dataclasses.replace(before, early_release=e)),
                                                  check=False)["us"] for e in (False, True)}  # fmt: skip
            row["ws"] = [attempt(p) for p in plans(k, m) if p.m_tile == (8 if m <= 8 else 16) and p.maxnreg != 48]
            good = [r for r in row["ws"] if "us" in r and r["err"] < 0.02]
            row["best_ws"] = min(good, key=lambda r: r["us"], default=None)
            best = row["best_ws"]["us"] if row["best_ws"] else float("nan")
            print(f"{name} m={m}: bf16 {row['bf16_us']:.1f} us, tuned {row['tuned']['us']:.2f} -> early "
                  f"{row['early']['us']:.2f} (err {row['early']['err']:.1e}), best early {best:.2f}, splits apart "
                  f"{row.get('splits_apart')}, products alone {row.get('products_alone')}", flush=True)  # fmt: skip
            rows.append(row)
            save_json(out, provenance(dev, "random 4-bit layers, Qwen3-8B shapes", torch.bfloat16)
                      | {"benchmark": "m7_ws_release", "checks": check_rows, "rows": rows})  # fmt: skip


def stages(out: str) -> None:
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
            base = dataclasses.replace(ops.as_ws_plan(tuned, m), early_release=False)

            def attempt(plan) -> dict:
                def run(layer):
                    return ws.launch_gptq_decode_ws(x, layer["pairs"], layer["scales"], layer["zeros"], None, 4, 128, plan)

                try:
                    err = rel_err(run(layers[0]), ref)
                    return dataclasses.asdict(plan) | {"us": graph_time_s([partial(run, L) for L in layers], dev) * 1e6,
                                                       "err": err}  # fmt: skip
                except Exception as exc:  # a plan that does not compile or launch is recorded, not fatal
                    return dataclasses.asdict(plan) | {"error": repr(exc)[:300]}

            row = {"layer": name, "m": m, "k": k, "n": n, "tuned_plan": dataclasses.asdict(tuned),
                   "bf16_us": graph_time_s([partial(F.linear, x, w) for w in dense], dev) * 1e6, "tuned": attempt(base),
                   "depths": [attempt(dataclasses.replace(base, stages=d, early_release=e))
                              for d in (2, 3, 4) for e in (False, True)]}  # fmt: skip
            row["ws"] = [] if m == 64 else [attempt(dataclasses.replace(p, stages=2)) for p in plans(k, m)
                                            if p.m_tile == (8 if m <= 8 else 16) and p.maxnreg != 48]  # fmt: skip
            good = [r for r in row["ws"] + row["depths"] if "us" in r and r["err"] < 0.02]
            row["best_ws"] = min(good, key=lambda r: r["us"], default=None)
            depths = {(r["stages"], r["early_release"]): round(r.get("us", float("nan")), 2) for r in row["depths"]}
            print(f"{name} m={m}: bf16 {row['bf16_us']:.1f}, tuned {row['tuned'].get('us', float('nan')):.2f}, "
                  f"depths {depths}, best {row['best_ws']}", flush=True)  # fmt: skip
            rows.append(row)
            save_json(out, provenance(dev, "random 4-bit layers, Qwen3-8B shapes", torch.bfloat16)
                      | {"benchmark": "m7_ws_release --stages", "rows": rows})  # fmt: skip


if __name__ == "__main__":
    stages(sys.argv[2]) if sys.argv[1] == "--stages" else measure(sys.argv[1])
